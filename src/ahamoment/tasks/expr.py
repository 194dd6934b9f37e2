"""A safe, exact evaluator for the small arithmetic expressions that Countdown answers use.

Never calls ``eval``: the text is parsed with ``ast.parse(mode="eval")`` and only integer
literals, parentheses and the allowed binary operators are walked. Values are exact
``Fraction``s, so ``8/(3-8/3)`` is exactly 24. Every failure, on any input string, is an
``ExprError`` with a short ``reason``.
"""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_LITERAL = 10**6

# Checked before parsing, so names, calls, floats, strings, hex and `1_000` never reach the parser.
_ALLOWED_CHARS = frozenset("0123456789+-*/() \t")
_BINOPS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
}


class ExprError(ValueError):
    """An expression that cannot be evaluated; ``reason`` says why in a few words."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def evaluate(
    text: str, ops: str = "+-*/", allow_unary_minus: bool = False
) -> tuple[Fraction, list[int]]:
    """Evaluate ``text`` exactly; return its value and the integer literals in reading order.

    ``ops`` is the allowed subset of ``"+-*/"``. Reasons: "empty", "too long", "non-ascii",
    "character", "syntax", "too deep", "operator", "literal", "division by zero".
    """
    if not isinstance(text, str):
        raise ExprError("syntax", f"expected a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ExprError("empty")
    if len(text) > MAX_CHARS:
        raise ExprError("too long", f"{len(text)} > {MAX_CHARS} characters")
    if not text.isascii():
        raise ExprError("non-ascii")
    bad = sorted(set(text) - _ALLOWED_CHARS)
    if bad:
        raise ExprError("character", repr("".join(bad)))
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExprError("syntax", str(e)) from None
    literals: list[int] = []
    value = _walk(tree.body, ops, allow_unary_minus, literals, depth=0)
    return value, literals


def _walk(
    node: ast.expr, ops: str, allow_unary_minus: bool, literals: list[int], depth: int
) -> Fraction:
    if depth > MAX_DEPTH:
        raise ExprError("too deep", f"more than {MAX_DEPTH} nested operations")
    if isinstance(node, ast.Constant):
        v = node.value
        if type(v) is not int:
            raise ExprError("literal", f"{v!r} is not an integer")
        if v > MAX_LITERAL:
            raise ExprError("literal", f"{v} > {MAX_LITERAL}")
        literals.append(v)
        return Fraction(v)
    if isinstance(node, ast.UnaryOp):
        if not (allow_unary_minus and isinstance(node.op, ast.USub)):
            raise ExprError("operator", f"unary {type(node.op).__name__}")
        return -_walk(node.operand, ops, allow_unary_minus, literals, depth + 1)
    if isinstance(node, ast.BinOp):
        sym = _BINOPS.get(type(node.op))
        if sym is None or sym not in ops:
            raise ExprError("operator", sym or type(node.op).__name__)
        left = _walk(node.left, ops, allow_unary_minus, literals, depth + 1)
        right = _walk(node.right, ops, allow_unary_minus, literals, depth + 1)
        if sym == "+":
            return left + right
        if sym == "-":
            return left - right
        if sym == "*":
            return left * right
        if right == 0:
            raise ExprError("division by zero")
        return left / right
    raise ExprError("syntax", type(node).__name__)
