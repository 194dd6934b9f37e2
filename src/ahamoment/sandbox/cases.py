"""Test cases: a call expression and the value it must return, and the parsers that make them.

``parse_assert`` reads MBPP/HumanEval-style lines, ``assert CALL == VALUE`` (either side may
be the literal, as may ``CALL is True/False/None``). The literal is read with
``ast.literal_eval`` plus ``set(...)``, ``frozenset(...)``, ``tuple(...)``, ``list(...)`` of a
literal and ``float("inf")``; it is never evaluated as code. Every other form (``<``,
``abs(x - y) < 1e-6``, ``math.isclose``, a bare ``assert f(x)``, chained comparisons) raises
NotGradable: this harness compares one returned value with one expected value, and a test it
cannot grade must never be passed silently.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ahamoment.sandbox.values import BadValue, check_expected


class NotGradable(ValueError):
    """A test this harness cannot grade; the message says why."""


@dataclass(frozen=True)
class TestCase:
    """``call`` is evaluated in the candidate's namespace; its value must equal ``expected``."""

    __test__ = False  # not a pytest class

    call: str
    """A Python expression, e.g. ``"add(2, 3)"``."""
    expected: Any
    """Plain data (see ahamoment.sandbox.values); compared in the harness, never sent."""

    def __post_init__(self) -> None:
        if not isinstance(self.call, str) or not self.call.strip():
            raise NotGradable(f"the call must be a non-empty expression, got {self.call!r}")
        try:
            ast.parse(self.call.strip(), mode="eval")
        except SyntaxError as e:
            raise NotGradable(f"the call {self.call!r} is not an expression: {e.msg}") from e
        try:
            check_expected(self.expected)
        except BadValue as e:
            raise NotGradable(f"the expected value of {self.call!r}: {e}") from e


_CONVERTERS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list}


def parse_assert(line: str) -> TestCase:
    """The TestCase of one ``assert CALL == VALUE`` line; NotGradable for any other form."""
    text = line.strip()
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise NotGradable(f"not Python: {text!r} ({e.msg})") from e
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise NotGradable(f"not a single assert statement: {text!r}")
    test = tree.body[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        raise NotGradable(f"not gradable by this harness (only `assert CALL == VALUE`): {text!r}")
    op, left, right = test.ops[0], test.left, test.comparators[0]
    if isinstance(op, ast.Is):
        if not (isinstance(right, ast.Constant) and right.value in (True, False, None)):
            raise NotGradable(f"`is` is gradable only against True, False or None: {text!r}")
        return TestCase(call=ast.unparse(left), expected=right.value)
    if not isinstance(op, ast.Eq):
        raise NotGradable(f"not gradable by this harness (only `assert CALL == VALUE`): {text!r}")
    if _is_literal(left):
        if _is_literal(right):
            raise NotGradable(f"neither side calls the program: {text!r}")
        left, right = right, left  # `assert 5 == add(2, 3)`
    return TestCase(call=ast.unparse(left), expected=_literal(right))


def _is_literal(node: ast.expr) -> bool:
    try:
        _literal(node)
        return True
    except NotGradable:
        return False


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        name = node.func.id
        if name in _CONVERTERS and len(node.args) <= 1:
            inner = _literal(node.args[0]) if node.args else ()
            try:
                return _CONVERTERS[name](inner)
            except TypeError as e:
                raise NotGradable(f"{ast.unparse(node)} is not a literal: {e}") from e
        if name == "float" and len(node.args) == 1 and isinstance(node.args[0], ast.Constant):
            arg = node.args[0].value
            if isinstance(arg, str) and arg.strip().lower().lstrip("+-") in ("inf", "infinity"):
                return float(arg)
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise NotGradable(f"the expected side {ast.unparse(node)!r} is not a literal") from e
    if isinstance(value, complex) or (isinstance(value, float) and math.isnan(value)):
        raise NotGradable(f"the expected side {ast.unparse(node)!r} is not plain data")
    return value


def load_tests(path: str | Path) -> list[TestCase]:
    """Rows ``{"call": ..., "expected": ...}`` or ``{"assert": "assert ..."}`` of a JSONL file.

    Raises NotGradable naming the file and line of the first bad row; blank lines are skipped.
    """
    cases = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise NotGradable(f"{where}: not JSON ({e.msg})") from e
        try:
            if isinstance(row, dict) and set(row) == {"assert"} and isinstance(row["assert"], str):
                cases.append(parse_assert(row["assert"]))
            elif isinstance(row, dict) and set(row) == {"call", "expected"}:
                cases.append(TestCase(call=row["call"], expected=row["expected"]))
            else:
                raise NotGradable(
                    'a row is {"call": "f(1)", "expected": 2} or {"assert": "assert f(1) == 2"}'
                )
        except NotGradable as e:
            raise NotGradable(f"{where}: {e}") from e
    if not cases:
        raise NotGradable(f"{path}: no test cases")
    return cases
