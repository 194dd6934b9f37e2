"""JSON Lines reading and held-out problem sets deduplicated by canonical form."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ahamoment.tasks.base import Problem, Task


class DataError(ValueError):
    """A bad data row; the message starts with ``path:line: ``."""


def read_jsonl(path: str | Path, *, tolerant: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, row)`` for each non-blank line; line numbers start at 1.

    Strict (the default, for inputs): a line that is not a UTF-8 JSON object raises
    ``DataError`` naming the file and line. ``tolerant`` (for files a live or killed run
    writes): a missing file is empty, and a torn or invalid line is skipped.
    """
    if tolerant and not Path(path).exists():
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
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
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


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
