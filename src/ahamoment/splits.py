"""Which problems may be trained on.

Every task reserves a fixed held-out set (the first ``HELDOUT_RESERVE`` distinct problems of a
fixed seed). A run evaluates on a prefix of it, and the pretraining corpus and the RL prompts
exclude all of it, plus every real benchmark problem packaged with ahamoment, by canonical form
(so a reordering of a held-out problem is excluded too).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from ahamoment.data import heldout_set
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem

HELDOUT_RESERVE = 1000
HELDOUT_SEED = 20250122  # DeepSeek-R1's release date; any fixed value works


def real_countdown_path() -> Path:
    """The packaged real Countdown sample (1,024 TinyZero problems; evaluation only)."""
    return Path(str(resources.files("ahamoment") / "benchmarks" / "countdown_3to4_sample.jsonl"))


@cache
def real_countdown() -> tuple[Problem, ...]:
    return tuple(get_task("countdown_tinyzero").load_jsonl(str(real_countdown_path())))


@cache
def _split(task_name: str) -> tuple[tuple[Problem, ...], frozenset[str]]:
    task = get_task(task_name)
    real = (
        {task.canonical(p) for p in real_countdown()}
        if task_name.startswith("countdown")
        else set()
    )
    held = heldout_set(task, HELDOUT_RESERVE, HELDOUT_SEED, exclude=set(real))
    exclude = frozenset(real | {task.canonical(p) for p in held})
    return tuple(held), exclude


def heldout(task_name: str, n: int) -> list[Problem]:
    if n > HELDOUT_RESERVE:
        raise ValueError(f"at most {HELDOUT_RESERVE} held-out problems are reserved; got {n}")
    return list(_split(task_name)[0][:n])


@cache
def excluded(task_name: str) -> frozenset[str]:
    """Canonical keys never to train on: the reserved held-out set and real benchmark rows,
    and the held-out sets of the tasks a mixture draws from (``shares_heldout_with``)."""
    out = _split(task_name)[1]
    for other in getattr(get_task(task_name), "shares_heldout_with", ()):
        out |= _split(other)[1]
    return out
