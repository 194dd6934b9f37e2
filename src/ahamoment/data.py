"""JSON Lines reading and held-out problem sets deduplicated by canonical form."""

from __future__ import annotations

import json
import random
import reprlib
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ahamoment.tasks.base import Problem, Task


class DataError(ValueError):
    """A bad data row; the message starts with ``path:line: ``."""


MAX_LINE_BYTES = 64 << 20
"""Longest JSONL line read (64 MiB): a longer one is an error, not a memory blow-up."""

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlist = _short.maxdict = 6


def show(value: Any) -> str:
    """A short repr for an error message: a huge value never makes a huge line."""
    return _short.repr(value)


def read_jsonl(path: str | Path, *, tolerant: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, row)`` for each non-blank line; line numbers start at 1.

    Strict (the default, for inputs): a line that is not a UTF-8 JSON object (or is longer
    than ``MAX_LINE_BYTES``) raises ``DataError`` naming the file and line. ``tolerant`` (for
    files a live or killed run writes): a missing file is empty, and a torn or invalid line is
    skipped.
    """
    if tolerant and not Path(path).exists():
        return
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            try:
                if len(raw) > MAX_LINE_BYTES:
                    while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                        raw = f.readline(MAX_LINE_BYTES)
                    raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB")
                row = _parse_line(raw, path, lineno)
            except DataError:
                if tolerant:
                    continue
                raise
            if row is not None:
                yield lineno, row


def _parse_line(raw: bytes, path: str | Path, lineno: int) -> dict[str, Any] | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # a number of 5,000 digits, nesting 10,000 deep
        raise DataError(f"{path}:{lineno}: invalid JSON ({str(e)[:80]})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def row_id(row: dict[str, Any], path: str | Path, lineno: int) -> str:
    """A row's optional ``id`` (a string or an integer) as a string; ``path:line`` without."""
    rid = row.get("id", f"{path}:{lineno}")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise DataError(f"{path}:{lineno}: 'id' must be a string or an integer, got {show(rid)}")
    return str(rid)


def sample_excluding(
    task: Task, rng: random.Random, exclude: AbstractSet[str], max_tries: int = 10_000
) -> Problem:
    """Draw ``task.sample(rng)`` until its canonical key is not in ``exclude``."""
    for _ in range(max_tries):
        p = task.sample(rng)
        if task.canonical(p) not in exclude:
            return p
    raise ValueError(
        f"{task.name}: no problem outside the {len(exclude)} excluded ones in {max_tries} draws"
    )


def heldout_set(task: Task, n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """``n`` problems with distinct canonical keys, none in ``exclude``, drawn with ``seed``."""
    exclude = exclude or set()
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    max_tries = 100 * n + 1000
    for _ in range(max_tries):
        if len(out) == n:
            break
        p = task.sample(rng)
        key = task.canonical(p)
        if key in seen or key in exclude:
            continue
        seen.add(key)
        out.append(p)
    if len(out) < n:
        raise ValueError(
            f"{task.name}: found only {len(out)} of {n} distinct held-out problems outside "
            f"the {len(exclude)} excluded ones in {max_tries} draws; the problem space is too "
            f"small, so ask for fewer or use a larger task"
        )
    return out
