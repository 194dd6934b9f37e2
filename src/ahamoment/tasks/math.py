"""Math word problems graded by :mod:`ahamoment.grading` (GSM8K, MATH, any problem/answer file).

The task has no generator: ``sample`` draws uniformly (with replacement) from a JSONL file of
``problem``/``answer`` rows. The registered ``math`` task reads the file named by the
environment variable ``AHAMOMENT_MATH_DATA``, so ``AHAMOMENT_MATH_DATA=train.jsonl aha zero
--task math --model DIR`` trains on it. For several files at once, make an instance per file in
your own module, ``MATH_A = MathTask("mypkg.tasks:MATH_A", "a.jsonl")``, and pass
``--task mypkg.tasks:MATH_A``: the name must be that import path so that a problem's ``task``
finds its grader again. ``aha zero`` reserves 1,000 distinct problems of the file as its held-out
set, so a training file needs more than that; there are no pretraining traces (use ``--model``).

Prompts: the question is the problem text; DeepSeek-R1's evaluation advice appends
``MATH_PROMPT_SUFFIX`` ("Please reason step by step, and put your final answer within
\\boxed{}."). ``verify`` takes what the model put in ``<answer>…</answer>`` or a whole
completion; either way the last ``\\boxed{…}`` in it, if any, is the answer (see grading.py).
"""

from __future__ import annotations

import os
import random
import re
from numbers import Real

from ahamoment import grading
from ahamoment.data import DataError, read_jsonl, row_id, show
from ahamoment.tasks import TASKS
from ahamoment.tasks.base import Problem, Task, TraceNoise, Verdict

MATH_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_ENV = "AHAMOMENT_MATH_DATA"

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _gold(answer: object) -> str | None:
    """The gold answer of a row as a string: GSM8K's '#### N' rationale becomes N (without
    thousands separators), a '\\boxed{…}' its content; None if there is no usable answer."""
    if isinstance(answer, bool) or not isinstance(answer, (str, Real)):
        return None
    if not isinstance(answer, str):
        return str(answer)
    m = _GSM8K_FINAL.search(answer)
    if m:
        answer = m.group(1).replace(",", "")
    elif "\\boxed" in answer or "\\fbox" in answer:
        answer = grading.last_boxed(answer) or ""
    return answer.strip() or None


def load_problem_jsonl(path: str, task: str = "math") -> list[Problem]:
    """Rows with a non-empty ``problem`` and an ``answer`` (string or number); ``id`` optional.

    Raises :class:`~ahamoment.data.DataError` naming ``path:line`` for a bad row.
    """
    out = []
    for lineno, row in read_jsonl(path):
        question = row.get("problem")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}:{lineno}: 'problem' must be a non-empty string")
        gold = _gold(row.get("answer"))
        if gold is None:
            raise DataError(
                f"{path}:{lineno}: 'answer' must be a non-empty string or a number, "
                f"got {show(row.get('answer'))}"
            )
        out.append(
            Problem(
                id=row_id(row, path, lineno),
                task=task,
                question=question,
                answer=gold,
                fields={k: v for k, v in row.items() if k in ("subject", "level")},
            )
        )
    return out


class MathTask(Task):
    """Problems from a JSONL file (``path``, else ``$AHAMOMENT_MATH_DATA``), read on first use."""

    prompt_suffix = MATH_PROMPT_SUFFIX

    def __init__(
        self, name: str = "math", path: str | None = None, grader: grading.Grader | None = None
    ) -> None:
        self.name = name
        self.path = path
        self._grader = grader
        self._problems: list[Problem] | None = None

    @property
    def grader(self) -> grading.Grader:
        return self._grader or grading.default_grader()

    def problems(self) -> list[Problem]:
        """The training file's problems (loaded once)."""
        if self._problems is None:
            path = self.path or os.environ.get(DATA_ENV)
            if not path:
                raise ValueError(
                    f"task {self.name!r} samples from a problem/answer JSONL file: set "
                    f"{DATA_ENV}=path/to/train.jsonl (or construct MathTask(name, path))"
                )
            self._problems = self.load_jsonl(path)
            if not self._problems:
                raise DataError(f"{path}: no problems")
        return self._problems

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.problems())

    def canonical(self, problem: Problem) -> str:
        """The problem text with whitespace collapsed (the same question twice is one problem)."""
        return " ".join(problem.question.split())

    def load_jsonl(self, path: str) -> list[Problem]:
        return load_problem_jsonl(path, task=self.name)

    def extract(self, completion: str) -> str | None:
        """The answer in a completion: the last ``<answer>…</answer>``, else the last
        ``\\boxed{…}`` (R1-style outputs have no tags); None if there is neither."""
        tagged = _TAG.findall(completion)
        if tagged:
            return tagged[-1].strip() or None
        return (grading.last_boxed(completion) or "").strip() or None

    def verify(self, problem: Problem, answer: str) -> Verdict:
        return self.grader.grade(problem.answer, answer)

    def normalize(self, answer: str) -> str:
        """The vote key: the final (boxed) answer; a plain number as its exact value."""
        final = grading.final_answer(answer) or ""
        number = grading.as_number(final, allow_var=True)
        if number is not None:
            return f"{number[0]}{'%' if number[1] else ''}"
        return "".join(final.split())

    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        raise NotImplementedError(
            f"{self.name}: math problems have no synthetic traces; pass --model to aha zero"
        )


MATH = TASKS.add("math", MathTask())
