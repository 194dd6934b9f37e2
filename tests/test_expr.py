"""The safe expression evaluator: exact values, literals, and a reason for every rejection."""

import random
import time
from fractions import Fraction

import pytest

from ahamoment.tasks.expr import ExprError, evaluate


@pytest.mark.parametrize(
    "text, ops, value, literals",
    [
        ("7-5+13", "+-", 15, [7, 5, 13]),
        (" (13 - 5) * 7 ", "+-*/", 56, [13, 5, 7]),
        ("8/(3-8/3)", "+-*/", 24, [8, 3, 8, 3]),  # 3-8/3 = 1/3, so 8/(1/3) = 24 exactly
        ("1/3", "+-*/", Fraction(1, 3), [1, 3]),
        ("((2))", "+", 2, [2]),
        ("(" * 99 + "2" + ")" * 99, "+", 2, [2]),  # brackets add no AST depth
        ("0", "+", 0, [0]),
        ("1000000", "+", 10**6, [10**6]),  # the largest literal allowed
        ("2-9", "+-", -7, [2, 9]),  # a negative result is fine; only unary minus is not
    ],
)
def test_evaluates_exactly(text, ops, value, literals):
    assert evaluate(text, ops) == (value, literals)


@pytest.mark.parametrize(
    "text, ops, reason",
    [
        ("", "+-", "empty"),
        ("   ", "+-", "empty"),
        ("2**99999", "+-*/", "operator"),  # rejected from the AST, never computed
        ("9**9**9**9", "+-*/", "operator"),
        ("7//2", "+-*/", "operator"),
        ("7%2", "+-*/", "character"),
        ("3*4", "+-", "operator"),  # * not in this task's ops
        ("-3+4", "+-", "operator"),  # unary minus off by default
        ("+3", "+-", "operator"),
        ("1000001", "+-", "literal"),
        ("9" * 150, "+-", "literal"),
        ("1" + "+1" * 100, "+-", "too long"),
        ("1" + "+1" * 40, "+-", "too deep"),
        ("1.5+2", "+-", "character"),
        ("1e3", "+-", "character"),
        ("0x10", "+-", "character"),
        ("1_000", "+-", "character"),
        ("abs(3)", "+-", "character"),
        ("x+1", "+-", "character"),
        ("'3'", "+-", "character"),
        ("__import__('os')", "+-", "character"),
        ("３+４", "+-", "non-ascii"),  # fullwidth digits
        ("7−5", "+-", "non-ascii"),  # unicode minus
        ("1/0", "+-*/", "division by zero"),
        ("5/(3-3)", "+-*/", "division by zero"),
        ("(1+2", "+-", "syntax"),
        ("1 2", "+-", "syntax"),
        ("()", "+-", "syntax"),
        ("07", "+-", "syntax"),  # Python rejects leading zeros
        ("1+\n2", "+-", "character"),
    ],
)
def test_rejects_with_reason(text, ops, reason):
    with pytest.raises(ExprError) as e:
        evaluate(text, ops)
    assert e.value.reason == reason


def test_unary_minus_when_allowed():
    assert evaluate("-3+4", "+-", allow_unary_minus=True) == (1, [3, 4])
    with pytest.raises(ExprError):
        evaluate("+3", "+-", allow_unary_minus=True)


def test_huge_exponent_is_fast():
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(ExprError):
            evaluate("2**99999**99999", "+-*/")
    assert time.perf_counter() - start < 1.0


def test_garbage_only_raises_expr_error():
    rng = random.Random(0)
    alphabet = "0123456789+-*/() .eEx_j'\"\\\n\t,;:=<>[]{}!@#$%^&~`|?abc−３\x00"
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            value, literals = evaluate(text, "+-*/")
        except ExprError:
            continue
        assert isinstance(value, Fraction) and all(isinstance(n, int) for n in literals)


def test_non_string_input():
    with pytest.raises(ExprError):
        evaluate(None)  # type: ignore[arg-type]
