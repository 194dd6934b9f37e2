"""Curricula (rl/curriculum.py): the adaptive mix against a fake policy of known accuracy per
level, "none" against sample_excluding, exclusions, resume, and the order of the levels."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest

from ahamoment.data import sample_excluding
from ahamoment.registry import UnknownName
from ahamoment.rl.curriculum import (
    CURRICULA,
    AdaptiveCurriculum,
    countdown_levels,
    make_curriculum,
)
from ahamoment.tasks import get_task

LEVELS = [lv.name for lv in countdown_levels()]
ACC = [0.95, 0.7, 0.5, 0.2, 0.02]
"""The fake policy's accuracy on each level, easiest first."""

# The mix at those accuracies with the defaults (target 0.5, width 0.2, floor 0.05, L = 5):
# w = exp(-((acc - 0.5) / 0.2)^2) = exp(-5.0625), exp(-1), 1, exp(-2.25), exp(-5.76)
#   = 0.00634, 0.36788, 1, 0.10540, 0.00315; sum 1.48277
# p = 0.95 * w / sum + 0.05 / 5 = 0.0141, 0.2457, 0.6507, 0.0775, 0.0120
EXPECTED_MIX = [0.0141, 0.2457, 0.6507, 0.0775, 0.0120]


def simulate(
    accuracy: Callable[[int], list[float]], steps: int = 300, P: int = 16, G: int = 8, seed=0
) -> tuple[AdaptiveCurriculum, list[list[float]]]:
    """Run the adaptive curriculum against a fake policy whose accuracy on level l at step s
    is ``accuracy(s)[l]``: each row is correct with that probability. Returns the curriculum
    and its mix after every step."""
    cur = make_curriculum("adaptive", "countdown", frozenset())
    draw_rng, policy_rng = random.Random(seed), random.Random(seed + 1)
    mixes = []
    for step in range(steps):
        acc = accuracy(step)
        levels = [cur.draw(draw_rng)[1] for _ in range(P)]
        rows = [name for name in levels for _ in range(G)]  # (P*G,) level of each row
        correct = [policy_rng.random() < acc[LEVELS.index(name)] for name in rows]
        cur.observe(rows, correct, G)
        mixes.append(list(cur.mix().values()))
    return cur, mixes


def mean_mix(mixes: list[list[float]]) -> list[float]:
    return [sum(m[i] for m in mixes) / len(mixes) for i in range(len(LEVELS))]


def test_mix_of_known_accuracies_is_the_hand_computed_one() -> None:
    cur = make_curriculum("adaptive", "countdown", frozenset())
    assert cur.mix() == pytest.approx(dict.fromkeys(LEVELS, 0.2))  # all at the prior: uniform
    cur.load_state_dict(
        {
            "curriculum": "adaptive",
            "accuracy": dict(zip(LEVELS, ACC)),
            "groups": dict.fromkeys(LEVELS, 100),
        }
    )
    assert list(cur.mix().values()) == pytest.approx(EXPECTED_MIX, abs=1e-4)
    # Expected group accuracy of that mix: sum p * acc = 0.526, near the 0.5 target.
    assert sum(p * a for p, a in zip(cur.mix().values(), ACC)) == pytest.approx(0.526, abs=1e-3)


def test_target_moves_the_peak() -> None:
    cur = make_curriculum("adaptive", "countdown", frozenset(), target=0.2)
    cur.load_state_dict(
        {
            "curriculum": "adaptive",
            "accuracy": dict(zip(LEVELS, ACC)),
            "groups": dict.fromkeys(LEVELS, 1),
        }
    )
    # w = exp(-((acc - 0.2) / 0.2)^2) = 0.0000, 0.0019, 0.1054, 1, 0.4449; sum 1.5522
    # p = 0.95 * w / sum + 0.01 = 0.0100, 0.0112, 0.0745, 0.6220, 0.2823
    assert list(cur.mix().values()) == pytest.approx(
        [0.0100, 0.0112, 0.0745, 0.6220, 0.2823], abs=1e-4
    )


def test_running_accuracy_is_a_mean_then_an_ema() -> None:
    cur = make_curriculum("adaptive", "countdown", frozenset(), ema=0.1)
    name = LEVELS[0]
    cur.observe([name] * 8, [True] * 6 + [False] * 2, 8)
    assert cur.accuracy[name] == 0.75  # the first group replaces the 0.5 prior
    cur.observe([name] * 8, [1.0] * 2 + [0.0] * 6, 8)
    assert cur.accuracy[name] == pytest.approx(0.5)  # mean of 0.75 and 0.25
    for _ in range(8):  # groups 3..10 all right: rate 1/n, so the mean of ten groups
        cur.observe([name] * 8, [True] * 8, 8)
    assert cur.accuracy[name] == pytest.approx((0.75 + 0.25 + 8) / 10)  # 0.9
    cur.observe([name] * 8, [False] * 8, 8)  # group 11: rate max(0.1, 1/11) = 0.1
    assert cur.accuracy[name] == pytest.approx(0.9 - 0.1 * 0.9)
    assert cur.groups[name] == 11
    assert all(cur.accuracy[n] == 0.5 for n in LEVELS[1:])  # unseen levels stay at the prior


def test_mix_converges_to_the_level_at_the_target() -> None:
    cur, mixes = simulate(lambda step: ACC)
    final = mean_mix(mixes[-100:])
    # Averaged over the last 100 steps the mix measured 0.017, 0.244, 0.665, 0.062, 0.012
    # (seed 0). Tolerance 0.04: the running accuracy of the 0.5 level has sd about
    # 0.177 * sqrt(0.1 / 1.9) = 0.04 (group sd sqrt(0.25 / 8), EMA weight 0.1), which moves
    # that level's share by a few points per step; 100 steps average most of it out.
    assert final == pytest.approx(EXPECTED_MIX, abs=0.04)
    assert max(range(5), key=final.__getitem__) == 2  # the 0.5 level
    assert final[2] > 0.6
    # The 0.95 and 0.02 levels: the floor's 0.01 plus 0.95 * 0.004 or 0.002 from the kernel
    # (0.014, 0.012); below 0.03 even if their estimate is off by 0.05 toward the target.
    assert final[0] < 0.03 and final[4] < 0.03
    # Each level was still measured: the floor gives the rarest about 0.01 * 16 groups a step.
    assert min(cur.groups.values()) >= 30
    assert cur.accuracy[LEVELS[4]] < 0.1 and cur.accuracy[LEVELS[0]] > 0.85


def test_mix_follows_a_policy_that_improves() -> None:
    # Skill rises linearly from 1 to 3 over 300 steps; accuracy on level l is
    # sigmoid(1.5 * (skill - l)), so the level at 0.5 accuracy is l = skill: level 1 at the
    # start, [0.82, 0.5, 0.18, 0.05, 0.01], level 3 at the end, [0.99, 0.95, 0.82, 0.5, 0.18].
    def accuracy(step: int) -> list[float]:
        skill = 1 + 2 * step / 299
        return [1 / (1 + math.exp(-1.5 * (skill - lv))) for lv in range(5)]

    _, mixes = simulate(accuracy)
    early, late = mean_mix(mixes[:50]), mean_mix(mixes[-50:])
    # Measured: early 0.06, 0.786, 0.123, 0.017, 0.014; late 0.014, 0.018, 0.146, 0.785, 0.038.
    assert max(range(5), key=early.__getitem__) == 1 and early[1] > 0.6
    assert max(range(5), key=late.__getitem__) == 3 and late[3] > 0.6
    assert late[1] < 0.05  # the level that was the edge is now easy
    # Mean skill over the two windows: 1.17 and 2.83, 1.67 apart; the mix's mean level moved
    # 1.14 -> 2.81 (it lags the policy by a few steps only).
    level = sum(i * p for i, p in enumerate(early)), sum(i * p for i, p in enumerate(late))
    assert level[0] == pytest.approx(1.17, abs=0.15)
    assert level[1] == pytest.approx(2.83, abs=0.15)


def test_none_draws_as_sample_excluding() -> None:
    task = get_task("countdown")
    first = random.Random(3)  # the first 5 problems the draws below would give: excluded
    exclude = frozenset(task.canonical(task.sample(first)) for _ in range(5))
    cur = make_curriculum("none", "countdown", exclude)
    rng_a, rng_b = random.Random(3), random.Random(3)
    drawn = [cur.draw(rng_a) for _ in range(50)]
    expected = [sample_excluding(task, rng_b, exclude) for _ in range(50)]
    assert [p.id for p, _ in drawn] == [p.id for p in expected]
    assert {level for _, level in drawn} == {"countdown"}
    assert {p.task for p, _ in drawn} == {"countdown"}
    assert cur.mix() == {"countdown": 1.0}
    assert cur.level_of(drawn[0][0]) == "countdown"
    state = json.loads(json.dumps(cur.state_dict()))
    cur.load_state_dict(state)
    with pytest.raises(ValueError, match="'none'"):
        make_curriculum("adaptive", "countdown", exclude).load_state_dict(state)


@pytest.mark.parametrize("name", ["none", "adaptive"])
def test_excluded_problems_are_never_drawn(name: str) -> None:
    free = make_curriculum(name, "countdown", frozenset())
    rng = random.Random(7)
    exclude = frozenset(
        get_task(p.task).canonical(p) for p, _ in (free.draw(rng) for _ in range(60))
    )
    # The same generator without the exclusion draws exactly these 60 problems ...
    cur = make_curriculum(name, "countdown", exclude)
    rng = random.Random(7)
    drawn = [cur.draw(rng)[0] for _ in range(60)]
    # ... and with it, none of them.
    assert not {get_task(p.task).canonical(p) for p in drawn} & exclude


def test_state_dict_round_trip_restores_the_future_draws() -> None:
    cur, _ = simulate(lambda step: ACC, steps=20)
    state = json.loads(json.dumps(cur.state_dict()))  # JSON-able
    resumed = make_curriculum("adaptive", "countdown", frozenset())
    assert resumed.mix() != cur.mix()  # a fresh one would draw otherwise
    resumed.load_state_dict(state)
    assert resumed.mix() == cur.mix()
    rng_a, rng_b = random.Random(5), random.Random(5)
    a = [cur.draw(rng_a) for _ in range(40)]
    b = [resumed.draw(rng_b) for _ in range(40)]
    assert [(p.id, lv) for p, lv in a] == [(p.id, lv) for p, lv in b]
    assert len({lv for _, lv in a}) >= 2  # the draws do depend on the mix
    rows = [lv for _, lv in a[:4] for _ in range(8)]
    cur.observe(rows, [True] * 32, 8)
    resumed.observe(rows, [True] * 32, 8)
    assert resumed.state_dict() == cur.state_dict()
    renamed = state | {"accuracy": {"other": 0.5}}
    with pytest.raises(ValueError, match="levels"):
        resumed.load_state_dict(renamed)


def test_levels_are_ordered_easiest_first() -> None:
    levels = countdown_levels()
    assert [lv.name for lv in levels] == [
        "n3_25_addsub",
        "n3_99_addsub",
        "n3_99_all",
        "n4_99_all",
        "n5_99_all",
    ]
    keys = []
    for lv in levels:
        rng = random.Random(0)
        problems = [lv.task.sample(rng) for _ in range(20)]
        sizes = {len(p.fields["nums"]) for p in problems}
        largest = max(n for p in problems for n in p.fields["nums"])
        n_ops = 4 if "+, -, * and /" in problems[0].question else 2
        assert "+ and -" in problems[0].question or n_ops == 4
        assert len(sizes) == 1
        keys.append((sizes.pop(), largest, n_ops))
        # Scoring finds each level's verifier through problem.task.
        assert get_task(problems[0].task) is lv.task
        assert all(p.fields["target"] <= 100 for p in problems)
    # (numbers, largest value drawn, operators): first 3 numbers to 25 with + -, then values
    # to 99, then all four operators, then 4 and 5 numbers.
    assert [(k, ops) for k, _, ops in keys] == [(3, 2), (3, 2), (3, 4), (4, 4), (5, 4)]
    assert keys[0][1] <= 25 < keys[1][1] <= 99
    assert keys == sorted(keys) and len(set(keys)) == 5


def test_level_of_names_the_level_drawn() -> None:
    cur = make_curriculum("adaptive", "countdown", frozenset())
    rng = random.Random(1)
    for problem, level in (cur.draw(rng) for _ in range(30)):
        assert cur.level_of(problem) == level
    with pytest.raises(ValueError, match="none of the levels"):
        cur.level_of(get_task("countdown_tinyzero").sample(rng))


def test_observe_rejects_malformed_batches() -> None:
    for name in CURRICULA:
        cur = make_curriculum(name, "countdown", frozenset())
        with pytest.raises(ValueError, match="multiple of group_size"):
            cur.observe(["n3_25_addsub"] * 7, [True] * 7, 4)
        with pytest.raises(ValueError, match="mix levels"):
            cur.observe(["n3_25_addsub"] * 3 + ["n4_99_all"], [True] * 4, 4)
    with pytest.raises(ValueError, match="unknown level"):
        make_curriculum("adaptive", "countdown", frozenset()).observe(["x"] * 2, [1, 0], 2)


def test_names_and_options_are_checked() -> None:
    assert {"none", "adaptive"} <= set(CURRICULA.names())
    with pytest.raises(UnknownName, match="curriculum"):
        make_curriculum("hardest", "countdown", frozenset())
    with pytest.raises(UnknownName, match="level set"):
        make_curriculum("adaptive", "math", frozenset())
    with pytest.raises(ValueError, match="target"):
        make_curriculum("adaptive", "countdown", frozenset(), target=1.0)
    with pytest.raises(TypeError):
        make_curriculum("adaptive", "countdown", frozenset(), widht=0.1)


def test_the_tinyzero_form_climbs_the_countdown_levels() -> None:
    # zero-aha.yaml trains with the adaptive curriculum and evaluates on the TinyZero form
    for task in ("countdown_tinyzero_100", "countdown_levels"):
        cur = make_curriculum("adaptive", task, frozenset())
        assert list(cur.mix()) == LEVELS
