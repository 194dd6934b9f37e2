"""Plain values: what a call may return, how it travels, and when it equals the expected value.

The child encodes a result as tagged JSON (``_runner.encode``); the harness decodes it here,
strictly, and compares it with :func:`same`. Plain data is ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes`` and ``list``/``tuple``/``dict``/``set``/``frozenset`` of plain
data. A subclass of one of these (a Counter, a namedtuple, an IntEnum, or an ``int`` whose
``__eq__`` is always True) travels as the builtin value it holds, read without running any of
its methods; anything else (an arbitrary object, a generator, a complex) is a bad result.

Equality is Python's ``==`` on the decoded values, with one deviation: **a bool is its own
type**, so ``True`` equals neither ``1`` nor ``1.0`` (a ``== 1`` test passed by ``True`` is an
accident or a hack, and ``is True`` asserts mean exactly this). As in Python, ``5 == 5.0``,
``(1, 2) != [1, 2]``, ``{1, 2} == frozenset({1, 2})`` and NaN equals nothing; an expected
value that holds a NaN is therefore refused as not gradable (:func:`check_expected`).
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64
"""Deeper values are not plain (the child refuses to encode them, the harness to decode)."""

_CONTAINERS = (list, tuple, dict, set, frozenset)


class BadValue(ValueError):
    """A value, or an encoded value, that is not plain data."""


def decode(tagged: Any, depth: int = 0) -> Any:
    """The Python value of one tagged JSON tree; BadValue on anything malformed."""
    if not isinstance(tagged, list) or not tagged or not isinstance(tagged[0], str):
        raise BadValue(f"not a tagged value: {str(tagged)[:80]}")
    if depth > MAX_DEPTH:
        raise BadValue(f"nested deeper than {MAX_DEPTH} levels")
    tag, args = tagged[0], tagged[1:]
    try:
        if tag == "N" and not args:
            return None
        (arg,) = args
        if tag == "b" and arg in (0, 1) and type(arg) is int:
            return arg == 1
        if tag == "i" and isinstance(arg, str):
            return int(arg, 16)
        if tag == "f" and isinstance(arg, str):
            return float(arg)
        if tag == "s" and isinstance(arg, str):
            return bytes.fromhex(arg).decode("utf-8", "surrogatepass")
        if tag == "y" and isinstance(arg, str):
            return bytes.fromhex(arg)
        if tag in ("l", "t", "S") and isinstance(arg, list):
            items = [decode(v, depth + 1) for v in arg]
            return items if tag == "l" else tuple(items) if tag == "t" else set(items)
        if tag == "d" and isinstance(arg, list):
            out = {}
            for pair in arg:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise BadValue("a dict entry is not a [key, value] pair")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
    except BadValue:
        raise
    except (ValueError, TypeError) as e:  # bad hex, bad digits, an unhashable key...
        raise BadValue(f"malformed {tag!r} value: {e}") from e
    raise BadValue(f"unknown or malformed tag {tag!r}")


def canon(value: Any, depth: int = 0) -> Any:
    """A hashable canonical form whose ``==`` is the equality described above.

    Numbers share one tag (``("n", 5) == ("n", 5.0)``: Python's int/float equality), bools
    have their own, sets and dict items become frozensets.
    """
    t = type(value)
    if depth > MAX_DEPTH:
        raise BadValue(f"nested deeper than {MAX_DEPTH} levels")
    if value is None:
        return ("N",)
    if t is bool:
        return ("b", value)
    if t is int or t is float:
        return ("n", value)
    if t is str:
        return ("s", value)
    if t is bytes:
        return ("y", value)
    if t is list or t is tuple:
        return ("l" if t is list else "t", tuple(canon(v, depth + 1) for v in value))
    if t is set or t is frozenset:
        return ("S", frozenset(canon(v, depth + 1) for v in value))
    if t is dict:
        items = frozenset((canon(k, depth + 1), canon(v, depth + 1)) for k, v in value.items())
        return ("d", items)
    raise BadValue(f"{t.__name__} is not plain data")


def same(result: Any, expected: Any) -> bool:
    """Whether a decoded result equals the expected value (see the module docstring)."""
    return canon(result) == canon(expected)


def check_expected(value: Any) -> None:
    """Raise BadValue unless ``value`` is plain data with no NaN (a test that can pass)."""
    canon(value)  # raises on anything not plain
    if _has_nan(value):
        raise BadValue("the expected value holds a NaN, which equals nothing")


def _has_nan(value: Any) -> bool:
    if type(value) is float:
        return math.isnan(value)
    if type(value) is dict:
        return any(_has_nan(k) or _has_nan(v) for k, v in value.items())
    if type(value) in _CONTAINERS:
        return any(_has_nan(v) for v in value)
    return False
