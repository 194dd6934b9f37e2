"""Evaluation metrics shared by every command: pass@k, cons@k, reflection and length statistics.

Every reported figure should carry the sampling settings it was measured with
(:class:`SampleSettings`): pass@1 at temperature 0.6 and at greedy decoding are different numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ahamoment.language import FOREIGN_SCRIPT


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Codex").

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that no
    large binomial is formed.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k} with n={n}; sample at least k per problem")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass1(correct: Sequence[bool]) -> float:
    """Mean correctness over samples (pass@1 estimated from all n samples)."""
    if len(correct) == 0:
        raise ValueError("pass1 of no samples is undefined")
    return sum(bool(x) for x in correct) / len(correct)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """cons@k for one problem: is the most frequent (non-None) answer correct?

    ``answers`` are already normalised by the caller; None marks a sample with no parsable
    answer and never votes. Ties go to the answer that appeared first. The result is the
    correctness flag of the first sample holding the winning answer; all None gives False.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    counts: dict[str, int] = {}  # insertion order = order of first occurrence
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return False
    winner = max(counts, key=lambda a: counts[a])  # max keeps the first of equal keys
    return bool(correct[answers.index(winner)])


REFLECTION_WORDS: tuple[str, ...] = ("wait", "check", "verif")
"""Word stems that mark reflection; each matches at a word start, case-insensitively, so
"check" also covers "checking" and "check:", and "verif" covers "verify" and "verification"."""

_REFLECTION_RE = re.compile(r"\b(?:" + "|".join(REFLECTION_WORDS) + ")", re.IGNORECASE)
# A line that ends by rejecting what it checked: ",no", "no.", "wrong", "incorrect!".
_REJECTION_RE = re.compile(r"\b(?:no|wrong|incorrect)\W*$", re.IGNORECASE)
# The reasoning ends where the answer starts; nothing after it counts as another try.
_END_OF_THINKING_RE = re.compile(r"</think>|<answer>", re.IGNORECASE)


def has_reflection(text: str) -> bool:
    """True when the text contains a reflection word (see :data:`REFLECTION_WORDS`)."""
    return _REFLECTION_RE.search(text) is not None


def reflection_rate(texts: Sequence[str]) -> float:
    """Fraction of texts with at least one reflection word."""
    if len(texts) == 0:
        raise ValueError("reflection_rate of no texts is undefined")
    return sum(has_reflection(t) for t in texts) / len(texts)


def is_self_correction(text: str) -> bool:
    """True when a check rejects a candidate and a new attempt follows it.

    Concretely, within the reasoning (the text before ``</think>`` or ``<answer>``): some line
    contains a reflection word and ends in a rejection (",no", "no", "wrong", "incorrect"),
    and some later line that is not itself a check contains "=" (another try).
    """
    thinking = _END_OF_THINKING_RE.split(text, maxsplit=1)[0]
    lines = thinking.splitlines()
    for i, line in enumerate(lines):
        if has_reflection(line) and _REJECTION_RE.search(line.strip()):
            if any("=" in later and not has_reflection(later) for later in lines[i + 1 :]):
                return True
    return False


def tries(text: str) -> list[str]:
    """The attempts in the reasoning: lines holding "=" that are not checks (no reflection
    word), in order."""
    thinking = _END_OF_THINKING_RE.split(text, maxsplit=1)[0]
    return [ln for ln in thinking.splitlines() if "=" in ln and not has_reflection(ln)]


def rejected_tries(text: str) -> list[str]:
    """The attempts a check rejected: for each check line that ends in a rejection (as in
    :func:`is_self_correction`), the nearest earlier attempt line; checks with no attempt
    before them are skipped."""
    thinking = _END_OF_THINKING_RE.split(text, maxsplit=1)[0]
    out, last = [], None
    for line in thinking.splitlines():
        if has_reflection(line):
            if last is not None and _REJECTION_RE.search(line.strip()):
                out.append(last)
        elif "=" in line:
            last = line
    return out


def is_mixed(text: str) -> bool:
    """True when the reasoning (before ``</think>``/``<answer>``) holds any foreign-script
    character (language.py): the chain of thought is not purely in the target language."""
    thinking = _END_OF_THINKING_RE.split(text, maxsplit=1)[0]
    return FOREIGN_SCRIPT.search(thinking) is not None


def mixing_rate(texts: Sequence[str]) -> float:
    """Language-mixing rate: the fraction of texts whose chain of thought is mixed (is_mixed).

    Its own rule, independent of the language reward (a share per completion): a CoT with one
    foreign symbol among a hundred counts fully here."""
    if len(texts) == 0:
        raise ValueError("mixing_rate of no texts is undefined")
    return sum(map(is_mixed, texts)) / len(texts)


# a step starts a number that no operator precedes: in "try:88+52+48=96" (a claim about a
# whole expression) "52+48=96" is not a step
_STEP_RE = re.compile(r"(?<![\d)+\-*/])(\d+)([+\-*])(\d+)=(-?\d+)")


def arithmetic_steps(text: str, reversed_digits: bool = False) -> tuple[int, int]:
    """(correct, total) integer steps ``a+b=c``, ``a-b=c``, ``a*b=c`` written in the reasoning;
    ``reversed_digits``: numbers are written least-significant digit first (85+28=041).

    The per-step reliability of sampled arithmetic decides whether a longer search can pay:
    log it beside accuracy.
    """
    thinking = _END_OF_THINKING_RE.split(text, maxsplit=1)[0]

    def num(s: str) -> int:
        return int(s[::-1]) if reversed_digits else int(s)

    ok = total = 0
    for a, op, b, c in _STEP_RE.findall(thinking):
        x, y = num(a), num(b)
        value = x + y if op == "+" else x - y if op == "-" else x * y
        ok += int(value == (int(c) if c.startswith("-") else num(c)))
        total += 1
    return ok, total


def step_accuracy(texts: Sequence[str], reversed_digits: bool = False) -> float | None:
    """Share of correct arithmetic steps over all texts; None when no text has a step."""
    ok = total = 0
    for t in texts:
        a, b = arithmetic_steps(t, reversed_digits)
        ok, total = ok + a, total + b
    return ok / total if total else None


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """``{"mean", "p90"}`` of completion lengths (p90: numpy's linear percentile); zeros if empty."""
    if len(lengths) == 0:
        return {"mean": 0.0, "p90": 0.0}
    arr = np.asarray(lengths, dtype=np.float64)
    return {"mean": float(arr.mean()), "p90": float(np.percentile(arr, 90, method="linear"))}


@dataclass
class SampleSettings:
    """How the samples behind a figure were drawn; record it next to every number."""

    temperature: float
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    n: int
    """Samples drawn per problem."""
    k: int
    """The k of pass@k / cons@k reported from those n samples."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 1 <= self.k <= self.n:
            raise ValueError(f"k must be in [1, n={self.n}], got {self.k}; raise n or lower k")

    def as_dict(self) -> dict[str, float | int]:
        """The settings as a plain dict, for logging beside a metric."""
        return asdict(self)
