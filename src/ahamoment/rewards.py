"""Rewards: pure functions ``fn(problem, completion) -> float``, registered by name.

``score`` computes a weighted sum of named rewards for a batch and keeps each component, the
count of rewards that raised, and the parse-failure rate, so a reward that silently zeroes
everything shows up in the logs. Any name of the form ``pkg.mod:fn`` is imported on demand.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ahamoment.language import is_foreign, reasoning
from ahamoment.registry import Registry
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem, Verdict

Reward = Callable[[Problem, str], float]
REWARDS = Registry[Reward]("reward")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last ``<answer>…</answer>``, or None if absent or empty."""
    found = _ANSWER.findall(completion)
    if not found:
        return None
    return found[-1].strip() or None


def judge(problem: Problem, completion: str) -> tuple[str | None, Verdict]:
    """The extracted answer and the task verifier's verdict on it.

    A task may say where its answer is (``task.extract``: math also takes the last
    ``\\boxed{}``); otherwise it is the last ``<answer>…</answer>``. Verdicts are memoised per
    (problem, completion), since a batch's rewards and its logged figures judge each twice and a
    LaTeX verdict costs a grader round trip.
    """
    return _judge(problem.task, problem.id, problem.question, problem.answer, problem, completion)


def _key(problem: Problem, completion: str) -> tuple:
    """The memo key of a verdict (what the verdict depends on)."""
    return (problem.task, problem.id, problem.question, problem.answer, completion)


def _judge(task_name, pid, question, gold, problem, completion):
    key = (task_name, pid, question, gold, completion)  # = _key(problem, completion)
    hit = _VERDICTS.get(key)
    if hit is not None:
        return hit
    task = get_task(task_name)
    answer = _extract(task, completion)
    if answer is None:
        out: tuple[str | None, Verdict] = (None, Verdict(False, False, "no answer"))
    else:
        out = (answer, task.verify(problem, answer))
    _remember(key, out)
    return out


def _extract(task, completion: str) -> str | None:
    extract = getattr(task, "extract", None)
    return extract(completion) if extract else extract_answer(completion)


def _remember(key: tuple, out: tuple[str | None, Verdict]) -> None:
    if len(_VERDICTS) >= 4096:
        _VERDICTS.pop(next(iter(_VERDICTS)))  # oldest first (dicts keep insertion order)
    _VERDICTS[key] = out


def judge_batch(problems: Sequence[Problem], completions: Sequence[str]) -> None:
    """Judge a batch ahead of ``judge`` where a task verifies batches (``verify_many``: the code
    task runs a step's programs in parallel sandboxes); the verdicts go to judge's memo. Tasks
    without ``verify_many`` are left alone: their answers are judged one by one, as before."""
    batched = {n for n in dict.fromkeys(p.task for p in problems) if _verify_many(n)}
    if not batched:
        return  # the common case (countdown, math, ...): nothing to do, no key built
    todo: dict[str, list[tuple[tuple, Problem, str]]] = {}
    for p, c in zip(problems, completions):
        if p.task in batched and (key := _key(p, c)) not in _VERDICTS:
            todo.setdefault(p.task, []).append((key, p, c))
    for name, rows in todo.items():
        task = get_task(name)
        many = task.verify_many
        answers = {key: _extract(task, c) for key, _, c in rows}
        asked = list({key: p for key, p, _ in rows if answers[key] is not None}.items())
        verdicts = many([p for _, p in asked], [answers[key] for key, _ in asked])
        for (key, _), verdict in zip(asked, verdicts):
            _remember(key, (answers[key], verdict))


def _verify_many(task_name: str):
    return getattr(get_task(task_name), "verify_many", None)


def task_stats(problems: Sequence[Problem], completions: Sequence[str]) -> dict[str, float]:
    """``task/<key>`` figures of a batch from each task's ``batch_stats`` (none for tasks
    without it); with several tasks in a batch, their figures are summed key by key."""
    out: dict[str, float] = {}
    names = dict.fromkeys(p.task for p in problems)
    for name in names:
        stats = getattr(get_task(name), "batch_stats", None)
        if stats is None:
            continue
        rows = [(p, c) for p, c in zip(problems, completions) if p.task == name]
        verdicts = [judge(p, c)[1] for p, c in rows]
        for k, v in stats([p for p, _ in rows], verdicts).items():
            out[f"task/{k}"] = out.get(f"task/{k}", 0) + v
    return out


_VERDICTS: dict[tuple, tuple[str | None, Verdict]] = {}  # bounded memo of _judge


@REWARDS.register("format")
def format_reward(problem: Problem, completion: str) -> float:
    """1.0 iff the completion is exactly ``<think>…</think>`` then ``<answer>…</answer>``."""
    m = _FORMAT.fullmatch(completion.strip())
    return 1.0 if m and m.group(1).strip() else 0.0


@REWARDS.register("accuracy")
def accuracy_reward(problem: Problem, completion: str) -> float:
    """1.0 iff the last tagged answer is correct by the problem's task verifier."""
    return 1.0 if judge(problem, completion)[1].correct else 0.0


@REWARDS.register("code")
def code_reward(problem: Problem, completion: str) -> float:
    """The share of the problem's tests that the answer's program passes (``Verdict.score``;
    tasks/code.py); 0 on a timeout, crash, attack or no answer. All-or-nothing is ``accuracy``.
    A task without partial credit scores as ``accuracy``."""
    verdict = judge(problem, completion)[1]
    return float(verdict.correct) if verdict.score is None else verdict.score


@REWARDS.register("language")
def language_reward(problem: Problem, completion: str) -> float:
    """Language consistency (DeepSeek-R1, stage 2): the share of the chain of thought written in
    the target language. Counted over letters and symbols (digits and whitespace are shared by
    both languages, see language.py); a chain of thought with none of them scores 1."""
    counted = [c for c in reasoning(completion) if not (c.isspace() or c.isdigit())]
    if not counted:
        return 1.0
    return sum(not is_foreign(c) for c in counted) / len(counted)


def parse_weights(spec: str) -> dict[str, float]:
    """``"accuracy=1.0,format=0.1"`` -> ``{"accuracy": 1.0, "format": 0.1}`` (weight 1 when
    omitted); every name must be a registered reward or an importable ``pkg.mod:fn``."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        try:
            weights[name.strip()] = float(w) if w else 1.0
        except ValueError as e:
            raise ValueError(f"reward {part!r}: weight must be a number") from e
        REWARDS.get(name.strip())
    if not weights:
        raise ValueError("reward: give at least one name=weight pair")
    return weights


@dataclass
class RewardBatch:
    """Rewards for a batch of completions, with what is needed to spot a broken reward."""

    total: list[float]
    """Weighted sum of the components, one per completion."""
    components: dict[str, list[float]]
    """Each reward's unweighted value, one per completion."""
    errors: dict[str, int]
    """How many completions each reward raised on (scored 0.0 there)."""
    parse_fail: list[bool]
    """True when there is no answer or the verifier could not parse it."""
    correct: list[bool]

    def select(self, rows: Sequence[int]) -> RewardBatch:
        """The given completions' rewards, in order (the error counts stay the batch's)."""
        return RewardBatch(
            total=[self.total[r] for r in rows],
            components={k: [v[r] for r in rows] for k, v in self.components.items()},
            errors=dict(self.errors),
            parse_fail=[self.parse_fail[r] for r in rows],
            correct=[self.correct[r] for r in rows],
        )

    @staticmethod
    def concat(parts: Sequence[RewardBatch]) -> RewardBatch:
        """Several batches' rewards one after another; error counts are summed."""
        return RewardBatch(
            total=[x for rb in parts for x in rb.total],
            components={
                k: [x for rb in parts for x in rb.components[k]] for k in parts[0].components
            },
            errors={k: sum(rb.errors[k] for rb in parts) for k in parts[0].errors},
            parse_fail=[x for rb in parts for x in rb.parse_fail],
            correct=[x for rb in parts for x in rb.correct],
        )


def score(
    problems: Sequence[Problem], completions: Sequence[str], weights: dict[str, float]
) -> RewardBatch:
    """Score each completion with ``sum(w * REWARDS.get(name)(p, c))`` over ``weights``."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    fns = {name: REWARDS.get(name) for name in weights}
    judge_batch(problems, completions)  # a no-op unless a task verifies batches
    n = len(completions)
    total = [0.0] * n
    components: dict[str, list[float]] = {}
    errors = dict.fromkeys(weights, 0)
    for name, fn in fns.items():
        values = []
        for p, c in zip(problems, completions):
            try:
                v = float(fn(p, c))
            except Exception:
                v = 0.0
                errors[name] += 1
            values.append(v)
        components[name] = values
        total = [t + weights[name] * v for t, v in zip(total, values)]
    parse_fail, correct = [], []
    for p, c in zip(problems, completions):
        _, verdict = judge(p, c)
        parse_fail.append(not verdict.parsed)
        correct.append(verdict.correct)
    return RewardBatch(
        total=total, components=components, errors=errors, parse_fail=parse_fail, correct=correct
    )
