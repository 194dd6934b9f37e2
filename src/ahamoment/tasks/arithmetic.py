"""Arithmetic: evaluate a short chain of multi-digit additions and subtractions.

Generated problems look like "What is 47+38-19?" with an integer answer (possibly negative).
``load_jsonl`` also reads generic rows with ``problem`` and an integer ``answer`` (GSM8K-style),
which can be graded but have no trace.

Answers must be plain integers: "66", " -5 " parse; "66.0", "+66", "1,000", fullwidth digits
and the unicode minus "−" do not (parsed=False), so a reward never depends on number styling.

Trace noise: ``p_false_hit`` makes one step off by 1 or 10 (a carry slip) and the chain
continues from the wrong value; ``p_check`` then adds ``wait,check:a+b=r,no`` with the
correct result and redoes the remaining steps. ``p_give_up`` is unused: there is no search.
"""

from __future__ import annotations

import random
import re

from ahamoment.data import DataError, read_jsonl, row_id, show
from ahamoment.tasks import TASKS
from ahamoment.tasks.base import Problem, Task, Template, TraceNoise, Verdict

_INT = re.compile(r"-?[0-9]{1,50}")
_SLIPS = (-10, -1, 1, 10)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _render(lines: list[str], answer: str, drop_tags: bool) -> str:
    if drop_tags:
        return "\n".join([*lines, answer])
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{answer}</answer>"


class Arithmetic(Task):
    """``n_operands`` operands of 1 to ``max_digits`` digits joined by + and -."""

    def __init__(
        self, name: str = "arithmetic", n_operands: tuple[int, ...] = (2, 3), max_digits: int = 3
    ) -> None:
        if not n_operands or min(n_operands) < 2 or max_digits < 1:
            raise ValueError("need n_operands >= 2 and max_digits >= 1")
        self.name = name
        self.n_operands = tuple(n_operands)
        self.max_digits = max_digits

    def sample(self, rng: random.Random) -> Problem:
        k = rng.choice(self.n_operands)
        operands = []
        for _ in range(k):
            d = rng.randint(1, self.max_digits)  # uniform digit count, then uniform value
            operands.append(rng.randint(10 ** (d - 1), 10**d - 1))
        ops = [rng.choice("+-") for _ in range(k - 1)]
        expr = str(operands[0]) + "".join(f"{o}{n}" for o, n in zip(ops, operands[1:]))
        value = operands[0]
        for o, n in zip(ops, operands[1:]):
            value = _apply(value, o, n)
        return Problem(
            id=f"{self.name}:{expr}",
            task=self.name,
            question=f"What is {expr}?",
            answer=str(value),
            fields={"operands": operands, "ops": ops, "expr": expr},
        )

    def canonical(self, problem: Problem) -> str:
        return problem.fields.get("expr") or problem.question

    def load_jsonl(self, path: str) -> list[Problem]:
        """Rows with ``problem`` (text) and ``answer`` (an integer or integer string)."""
        out = []
        for lineno, row in read_jsonl(path):
            question, answer = row.get("problem"), row.get("answer")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{path}:{lineno}: 'problem' must be a non-empty string")
            if type(answer) is int:
                answer = str(answer)
            if not isinstance(answer, str) or not _INT.fullmatch(answer.strip()):
                raise DataError(f"{path}:{lineno}: 'answer' must be an integer, got {show(answer)}")
            out.append(
                Problem(
                    id=row_id(row, path, lineno),
                    task=self.name,
                    question=question,
                    answer=answer.strip(),
                )
            )
        return out

    def normalize(self, answer: str) -> str:
        """The answer without whitespace (the key for majority voting)."""
        return "".join(answer.split())

    def verify(self, problem: Problem, answer: str) -> Verdict:
        if not isinstance(answer, str) or not _INT.fullmatch(answer.strip()):
            return Verdict(correct=False, parsed=False, reason="unparseable")
        if not _INT.fullmatch(problem.answer.strip()):
            # A gold answer we cannot read must never give credit.
            return Verdict(correct=False, parsed=True, reason="bad gold")
        if int(answer) != int(problem.answer):
            return Verdict(correct=False, parsed=True, reason="value")
        return Verdict(correct=True, parsed=True)

    def templates(self) -> list[Template]:
        """The first operand, and the sum of all operands (every sign read as +)."""
        return [
            ("first operand", lambda p: str(p.fields.get("operands", [""])[0])),
            ("sum of operands", lambda p: str(sum(p.fields.get("operands", [])))),
        ]

    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        if "operands" not in problem.fields:
            raise ValueError(f"{problem.id}: only generated problems have a trace")
        operands, ops = problem.fields["operands"], problem.fields["ops"]
        slip_at = rng.randrange(len(ops)) if rng.random() < noise.p_false_hit else -1
        steps, acc = [], operands[0]
        for i, (o, b) in enumerate(zip(ops, operands[1:])):
            r = _apply(acc, o, b) + (rng.choice(_SLIPS) if i == slip_at else 0)
            steps.append(f"{acc}{o}{b}={r}")
            acc = r
        lines = [",".join(steps)]
        if slip_at >= 0 and rng.random() < noise.p_check:
            acc = operands[0]
            for o, b in zip(ops[:slip_at], operands[1:]):
                acc = _apply(acc, o, b)
            o, b = ops[slip_at], operands[slip_at + 1]
            acc_fixed = _apply(acc, o, b)
            lines.append(f"wait,check:{acc}{o}{b}={acc_fixed},no")
            redo, acc = [], acc_fixed
            for o, b in zip(ops[slip_at + 1 :], operands[slip_at + 2 :]):
                redo.append(f"{acc}{o}{b}={_apply(acc, o, b)}")
                acc = _apply(acc, o, b)
            if redo:
                lines.append(",".join(redo))
        return _render(lines, str(acc), drop_tags=rng.random() < noise.p_drop_tags)


ARITHMETIC = TASKS.add("arithmetic", Arithmetic())
