"""A local code sandbox: run an untrusted program against test cases, score it, trust nothing.

One entry point, :func:`run_tests`, plus :func:`run_many` for a GRPO step's batch and
:func:`parse_assert` for MBPP/HumanEval lines::

    from ahamoment.sandbox import TestCase, parse_assert, run_tests

    tests = [TestCase(call="add(2, 3)", expected=5), parse_assert("assert add(1, 1) == 2")]
    result = run_tests("def add(a, b):\\n    return a + b\\n", tests, timeout=2)
    result.passed, result.total, result.status, result.reward()  # 2, 2, "passed", 1.0

The program runs in a child process that cannot see the expected values, answers one call at
a time over a pipe, and is graded here on plain-data replies. Linux only, stdlib only. What is
isolated, how, and what a kernel without namespaces loses: docs/sandbox.md. The CLI:
``python -m ahamoment.sandbox``.
"""

from ahamoment.sandbox.cases import NotGradable, TestCase, load_tests, parse_assert
from ahamoment.sandbox.harness import STATUSES, Limits, Result, isolation, run_many, run_tests
from ahamoment.sandbox.values import BadValue, same

__all__ = [
    "STATUSES",
    "BadValue",
    "Limits",
    "NotGradable",
    "Result",
    "TestCase",
    "isolation",
    "load_tests",
    "parse_assert",
    "run_many",
    "run_tests",
    "same",
]
