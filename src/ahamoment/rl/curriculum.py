"""Curricula: where each step's training problems come from, picked by name (``CURRICULA``).

Every entry builds an object with the same five methods, so the trainer loop never branches:

- ``draw(rng) -> (problem, level)``: one training problem and the name of its level; never a
  problem whose canonical key is in ``exclude`` (``data.sample_excluding``).
- ``observe(levels, correct, group_size)``: after scoring, the level and correctness of every
  row of the step, ``B = P * G`` rows with consecutive rows of a group sharing a prompt.
- ``mix() -> {level: probability}``: the current sampling distribution, to log every step.
- ``level_of(problem) -> level``: the level of a drawn problem (from ``problem.task``), for
  callers such as ``rollouts.sample_groups`` that keep only the problems.
- ``state_dict()`` / ``load_state_dict(state)``: plain JSON-able dicts, so a resumed run
  draws what an uninterrupted one would.

``"none"``
    One task, uniformly: exactly ``rollouts.PromptSource`` (``sample_excluding(task, rng,
    exclude)``, the same draws for the same generator). One level, named after the task.

``"adaptive"``
    An ordered set of difficulty levels (``LEVEL_SETS``; for Countdown the count of numbers,
    their range and the operators, ``countdown_levels``) and a running group accuracy per level.
    The rule, in full:

    1. Accuracy per level: a group's accuracy is the mean of its rows; each group of level l
       updates ``acc[l] += rate * (group_acc - acc[l])`` with ``rate = max(ema, 1 / n[l])``,
       ``n[l]`` the groups of l seen so far. Up to ``1 / ema`` groups that is the plain mean
       (the first group replaces the prior), then an exponential moving average over about
       the last ``1 / ema`` groups, so the estimate follows a policy that improves. A level
       never seen sits at ``prior`` (default: the target, so each level is tried early on).
    2. Weights: ``w[l] = exp(-((acc[l] - target) / width) ** 2)``, a Gaussian bump centred on
       the target accuracy.
    3. Mix: ``p[l] = (1 - floor) * w[l] / sum(w) + floor / L``: a uniform share ``floor``
       keeps every level measured, so a level that was too hard is noticed once it is not.

    With the defaults (target 0.5, width 0.2, floor 0.05) and five levels at accuracies 0.95,
    0.7, 0.5, 0.2, 0.02 the mix is 0.014, 0.246, 0.651, 0.077, 0.012 (worked out in
    ``tests/test_curriculum.py``): most groups sit at the policy's edge, the rest one level
    either side, and the expected group accuracy is 0.53.

Why accuracy near 0.5: a GRPO group whose G rewards are all equal has zero advantage and
gives no gradient; DAPO's dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale", arXiv:2503.14476; ``group_filter="nonconstant"``
in ``rl/shaping.py``) drops such groups after sampling them and samples again. Bae et al.
2025, "Online Difficulty Filtering for Reasoning Oriented Reinforcement Learning"
(arXiv:2504.03380), show that the expected improvement is lower-bounded by the variance of
the problems' pass rates p(1 - p), largest at p = 0.5, and keep ("balanced filtering") only
prompts of intermediate accuracy measured on the fly.

How this differs from both: they filter single prompts after their groups are generated
(paying for the dropped rollouts); this picks a *level* before generating, from the running
accuracy of earlier groups of that level, so nothing is generated to be thrown away, and it
composes with the group filter (which then drops fewer groups). The kernel is a Gaussian
rather than p(1 - p): p(1 - p) is fixed at 0.5 and flat (a level at 0.95 still weighs 0.19 of
one at 0.5, and would get 7% of the groups above), while the Gaussian takes any target and
its width sets how sharply the mix concentrates.

Use in a trainer (all ranks draw with the same per-step generator and observe the same
gathered batch, so every rank holds the same curriculum state)::

    problems = [curriculum.draw(rng)[0] for _ in range(P)]   # before sampling
    ...                                                      # generate G each, score
    curriculum.observe([curriculum.level_of(p) for p in batch.problems],
                       batch.rewards.correct, G)             # after scoring
    log({f"curriculum/{k}": v for k, v in curriculum.mix().items()})

Observe *every* group that was sampled, including those a group filter dropped: an
all-wrong or all-right group is exactly the evidence that a level is too hard or too easy.

The Countdown levels are tasks of their own (``tasks.countdown.COUNTDOWN_LEVELS``, registered
as ``countdown_<level>``), so scoring finds their verifier through ``problem.task``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Protocol

from ahamoment.data import sample_excluding
from ahamoment.registry import Registry
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem, Task
from ahamoment.tasks.countdown import COUNTDOWN, COUNTDOWN_LEVELS, Countdown


@dataclass(frozen=True)
class Level:
    """One difficulty level: a name (used in logs and state) and the task it draws from."""

    name: str
    task: Task


class Curriculum(Protocol):
    """What the trainer calls; every ``CURRICULA`` entry returns one (see the module doc)."""

    def draw(self, rng: random.Random) -> tuple[Problem, str]: ...

    def observe(
        self, levels: Sequence[str], correct: Sequence[bool | float], group_size: int
    ) -> None: ...

    def mix(self) -> dict[str, float]: ...

    def level_of(self, problem: Problem) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CurriculumFactory = Callable[..., Curriculum]
CURRICULA: Registry[CurriculumFactory] = Registry("curriculum")
LEVEL_SETS: Registry[Callable[[], list[Level]]] = Registry("level set")


# --- levels ---------------------------------------------------------------------------------


def _level_name(task: Countdown) -> str:
    return task.name.removeprefix("countdown_") if task is not COUNTDOWN else "n3_25_addsub"


@LEVEL_SETS.register("countdown")
def countdown_levels() -> list[Level]:
    """Countdown levels, easiest first: 3 numbers to 25 with + -; 3 numbers to 99 with + -;
    then 3, 4 and 5 numbers to 99 with + - * /, targets up to 100."""
    return [Level(_level_name(t), t) for t in COUNTDOWN_LEVELS]


# the TinyZero form (evaluated on) and the levels' mixture climb the same levels
LEVEL_SETS.add("countdown_tinyzero_100", countdown_levels)
LEVEL_SETS.add("countdown_levels", countdown_levels)


# --- observations ---------------------------------------------------------------------------


def group_accuracies(
    levels: Sequence[str], correct: Sequence[bool | float], group_size: int
) -> list[tuple[str, float]]:
    """``(level, mean correctness)`` of each group of ``group_size`` consecutive rows."""
    if group_size < 1 or len(levels) != len(correct) or len(levels) % group_size:
        raise ValueError(
            f"observe needs as many levels as results ({len(levels)} vs {len(correct)}), "
            f"a multiple of group_size={group_size}"
        )
    out = []
    for start in range(0, len(levels), group_size):
        names = set(levels[start : start + group_size])
        if len(names) != 1:
            raise ValueError(f"rows {start}..{start + group_size - 1} mix levels {sorted(names)}")
        out.append(
            (levels[start], sum(map(float, correct[start : start + group_size])) / group_size)
        )
    return out


# --- "none": one task, as PromptSource --------------------------------------------------------


class UniformCurriculum:
    """One task, every problem equally likely: the behaviour of ``rollouts.PromptSource``."""

    def __init__(self, task: Task, exclude: AbstractSet[str]) -> None:
        self.task = task
        self.exclude = exclude

    def draw(self, rng: random.Random) -> tuple[Problem, str]:
        return sample_excluding(self.task, rng, self.exclude), self.task.name

    def observe(
        self, levels: Sequence[str], correct: Sequence[bool | float], group_size: int
    ) -> None:
        group_accuracies(levels, correct, group_size)  # checked, as for every curriculum

    def mix(self) -> dict[str, float]:
        return {self.task.name: 1.0}

    def level_of(self, problem: Problem) -> str:
        return self.task.name

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": "none"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "none")


@CURRICULA.register("none")
def uniform(task_name: str, exclude: AbstractSet[str], target: float = 0.5) -> UniformCurriculum:
    """``task_name`` uniformly (``target`` is unused: nothing adapts)."""
    return UniformCurriculum(get_task(task_name), exclude)


# --- "adaptive": levels near a target accuracy ------------------------------------------------


class AdaptiveCurriculum:
    """Levels drawn with probability peaked where their running accuracy is near ``target``
    (the rule is in the module docstring)."""

    def __init__(
        self,
        levels: Sequence[Level],
        exclude: AbstractSet[str],
        target: float = 0.5,
        width: float = 0.2,
        floor: float = 0.05,
        ema: float = 0.1,
        prior: float | None = None,
    ) -> None:
        names = [lv.name for lv in levels]
        if not levels or len(set(names)) != len(names):
            raise ValueError(f"need one or more levels with distinct names, got {names}")
        if len({lv.task.name for lv in levels}) != len(levels):
            raise ValueError("each level needs its own task name (level_of reads problem.task)")
        if not 0 < target < 1:
            raise ValueError(f"target is a group accuracy strictly between 0 and 1, got {target}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor is a share of the mix in [0, 1], got {floor}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema is the weight of each new group in (0, 1], got {ema}")
        prior = target if prior is None else prior
        if not 0 <= prior <= 1:
            raise ValueError(f"prior is an accuracy in [0, 1], got {prior}")
        self.levels = list(levels)
        self.exclude = exclude
        self.target, self.width, self.floor, self.ema, self.prior = target, width, floor, ema, prior
        self._by_task = {lv.task.name: lv.name for lv in levels}
        self.accuracy = {n: prior for n in names}
        """Running group accuracy per level (``prior`` until a group is seen)."""
        self.groups = {n: 0 for n in names}
        """Groups observed per level."""
        self._probs = self._compute_mix()

    def draw(self, rng: random.Random) -> tuple[Problem, str]:
        level = rng.choices(self.levels, weights=self._probs)[0]
        return sample_excluding(level.task, rng, self.exclude), level.name

    def observe(
        self, levels: Sequence[str], correct: Sequence[bool | float], group_size: int
    ) -> None:
        for name, acc in group_accuracies(levels, correct, group_size):
            if name not in self.accuracy:
                raise ValueError(f"unknown level {name!r}; the levels are {list(self.accuracy)}")
            self.groups[name] += 1
            rate = max(self.ema, 1 / self.groups[name])
            self.accuracy[name] += rate * (acc - self.accuracy[name])
        self._probs = self._compute_mix()

    def mix(self) -> dict[str, float]:
        return {lv.name: p for lv, p in zip(self.levels, self._probs)}

    def level_of(self, problem: Problem) -> str:
        try:
            return self._by_task[problem.task]
        except KeyError:
            raise ValueError(
                f"problem {problem.id!r} of task {problem.task!r} is from none of the levels"
            ) from None

    def state_dict(self) -> dict[str, Any]:
        return {
            "curriculum": "adaptive",
            "accuracy": dict(self.accuracy),
            "groups": dict(self.groups),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "adaptive")
        if set(state["accuracy"]) != set(self.accuracy) or set(state["groups"]) != set(self.groups):
            raise ValueError(
                f"the saved curriculum has levels {sorted(state['accuracy'])}, "
                f"this run has {sorted(self.accuracy)}"
            )
        self.accuracy = {n: float(state["accuracy"][n]) for n in self.accuracy}
        self.groups = {n: int(state["groups"][n]) for n in self.groups}
        self._probs = self._compute_mix()

    def _compute_mix(self) -> list[float]:
        d2 = [((self.accuracy[lv.name] - self.target) / self.width) ** 2 for lv in self.levels]
        w = [math.exp(min(d2) - x) for x in d2]  # scaled so the largest is 1: never all 0
        total, L = sum(w), len(w)
        return [(1 - self.floor) * x / total + self.floor / L for x in w]


@CURRICULA.register("adaptive")
def adaptive(
    task_name: str, exclude: AbstractSet[str], target: float = 0.5, **options: Any
) -> AdaptiveCurriculum:
    """The levels of ``task_name`` (``LEVEL_SETS``) kept near ``target`` group accuracy;
    options: ``width``, ``floor``, ``ema``, ``prior`` (``AdaptiveCurriculum``)."""
    return AdaptiveCurriculum(LEVEL_SETS.get(task_name)(), exclude, target, **options)


def make_curriculum(
    name: str, task_name: str, exclude: AbstractSet[str], target: float = 0.5, **options: Any
) -> Curriculum:
    """The curriculum ``name`` (``CURRICULA``) over ``task_name``, never drawing a problem whose
    canonical key is in ``exclude`` (e.g. ``splits.excluded(task_name)``)."""
    return CURRICULA.get(name)(task_name, exclude, target=target, **options)


@dataclass(frozen=True)
class CurriculumSource:
    """A curriculum as ``rollouts.sample_groups``' prompt source: ``draw(rng) -> Problem``."""

    curriculum: Curriculum

    def draw(self, rng: random.Random) -> Problem:
        return self.curriculum.draw(rng)[0]


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("curriculum") != kind:
        raise ValueError(
            f"the saved curriculum is {state.get('curriculum')!r}, this run's is {kind!r}"
        )
