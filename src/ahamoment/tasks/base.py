"""The task interface: a seeded generator, a JSONL loader, the prompt, a verifier, and the
noisy solution traces that make the pretraining corpus of the embedded default model."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Problem:
    """One task instance.

    ``question`` is the user-facing text that goes into the R1-Zero template; ``answer`` is
    the gold answer as a string (for Countdown only the target: it is *not* a valid
    completion answer); ``fields`` holds task-specific data such as ``nums`` and ``target``.
    """

    id: str
    task: str
    question: str
    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    """What a verifier says about one extracted answer."""

    correct: bool
    parsed: bool
    """False when the answer could not be parsed at all (counted as a parse failure)."""
    reason: str = ""
    score: float | None = None
    """Partial credit in [0, 1] where the task has it (code: the share of tests passed); None:
    ``correct`` is all there is."""


@dataclass
class TraceNoise:
    """How the synthetic pretraining traces go wrong."""

    p_give_up: float = 0.6
    """After each miss, stop searching and guess a random candidate with this probability."""
    p_false_hit: float = 0.2
    """On a miss, claim a hit anyway (a slip that a 'wait,check:' line can catch)."""
    p_check: float = 0.25
    """After a claimed hit, write a 'wait,check:' line that recomputes the last step."""
    p_drop_tags: float = 0.1
    """Drop the <think>/<answer> tags of a trace (a format failure for RL to fix)."""
    p_guess: float = 1.0
    """On giving up, answer a random candidate (a guess); otherwise answer the last try."""
    p_foreign: float = 0.0
    """Write each reasoning line in the second language (language.py) with this probability."""
    search_ops: str = ""
    """Operators the traces' tries use (empty: all of the task's); e.g. "+-" keeps every step
    a 2-digit addition or subtraction on the TinyZero form."""
    inline_target: bool = True
    """End each try with "|target" before its verdict. False: the verdict compares the result
    with the prompt's target from memory (unreliable in a tiny model), and only a check line
    writes the adjacent comparison, so re-checking a claimed hit carries information."""
    guess_first: bool = False
    """Each try names a candidate and claims it ("try:58+82-4=45"), then either commits to it
    or, with probability p_check, computes it step by step on a 'wait,check:' line that accepts
    or rejects it; after a rejection the next guess follows (or, with p_give_up, an answer).
    p_false_hit is unused: the unverified claim is the slip."""
    reversed_digits: bool = False
    """Write every number in the reasoning least-significant digit first (58+82=140 becomes
    85+28=041): each digit then depends only on digits already written and the carry, which
    small transformers learn far more reliably (Lee et al. 2023). The answer stays standard."""
    search_order: str = "random"
    """How a Countdown trace orders its tries (``tasks.countdown.SEARCH_ORDERS``): "random"
    (every left-to-right chain, shuffled) or "strategy" (sums and differences first, then a
    product or quotient, then a bracketed sum times a number)."""
    named_tries: bool = False
    """Start each Countdown try with its expression in standard notation
    (``58+82-4:85+28=041,...``), so the answer copies it instead of turning reversed digits
    back."""
    check_by_difference: bool = False
    """A 'wait,check:' line subtracts the smaller of result and target from the larger
    (``wait,check:16-15=1,no``; a hit gives ``16-16=0,yes``) instead of recomputing the last
    step: the verdict then rests on the model's subtraction, not on telling two near numbers
    apart."""


# A constant template: a name plus a function from a problem to an answer string.
Template = tuple[str, Callable[[Problem], str]]


class Task:
    """Base class: subclasses implement the methods below and register an instance.

    Two optional methods, looked up with ``getattr`` (a task without them is not affected):

    - ``verify_many(problems, answers) -> list[Verdict]``: verify a batch at once (the code
      task runs its programs in parallel sandboxes). ``rewards.score`` calls it once per
      batch, before the rewards, for the answers not yet judged.
    - ``batch_stats(problems, verdicts) -> dict[str, float]``: the task's own figures of a
      scored batch (the code task: counts by sandbox status), logged every GRPO step as
      ``task/<key>`` (``rewards.task_stats``, ``rl.rollouts.rollout_metrics``).
    - ``tried_answer(line) -> str | None``: the answer a reasoning line tries, where the line
      names one (Countdown's named tries); it lets ``evaluation.rejections`` ask whether a
      candidate that a check rejected was really wrong.
    """

    name: str = ""
    prompt_suffix: str = ""
    """An instruction appended to every question in the prompt (``prompts.prompt_text``)."""

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def canonical(self, problem: Problem) -> str:
        """A key equal for problems that are the same up to reordering (used for dedupe)."""
        raise NotImplementedError

    def load_jsonl(self, path: str) -> list[Problem]:
        raise NotImplementedError

    def verify(self, problem: Problem, answer: str) -> Verdict:
        raise NotImplementedError

    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        """A noisy completion (``<think>…</think>\\n<answer>…</answer>``) for the corpus."""
        raise NotImplementedError

    def normalize(self, answer: str) -> str:
        """The form answers are compared in for a majority vote (default: no whitespace)."""
        return "".join(answer.split())

    def templates(self) -> list[Template]:
        """Constant answer templates, for the baseline measured before training."""
        return []
