"""The aha base's corpus: the Countdown levels, the "strategy" search order, named tries, and
the figures that say whether a search is real (tries, rejected attempts, check precision)."""

import itertools
import json
import random
import re

import pytest

from ahamoment.evaluation import ratio_of_sums, rejections
from ahamoment.metrics import is_self_correction, rejected_tries, tries
from ahamoment.rewards import accuracy_reward, extract_answer, format_reward
from ahamoment.splits import excluded, heldout, real_countdown_path
from ahamoment.tasks import TraceNoise, get_task
from ahamoment.tasks.countdown import COUNTDOWN_LEVELS, SEARCH_ORDERS, _reachable_int

TZ100 = get_task("countdown_tinyzero_100")
LEVELS = get_task("countdown_levels")
AHA = TraceNoise(
    p_give_up=0.3,
    p_false_hit=0.15,
    p_check=0.5,
    p_drop_tags=0.0,
    p_guess=0.0,
    reversed_digits=True,
    check_by_difference=True,
    search_order="strategy",
    named_tries=True,
)


def _brute_int(nums: tuple[int, ...]) -> set[int]:
    """Every value of every bracketing, each intermediate an integer >= 0 (plain recursion)."""
    if len(nums) == 1:
        return {nums[0]}
    out: set[int] = set()
    for i, j in itertools.combinations(range(len(nums)), 2):
        rest = tuple(x for k, x in enumerate(nums) if k not in (i, j))
        a, b = nums[i], nums[j]
        for v in {a + b, abs(a - b), a * b} | {
            x // y for x, y in ((a, b), (b, a)) if y and not x % y
        }:
            out |= _brute_int((v, *rest))
    return out


@pytest.mark.parametrize("nums", [(3, 5, 7), (2, 3, 4, 6), (1, 1, 9), (25, 5, 2, 10, 3)])
def test_integer_reachable_matches_brute_force(nums):
    want = tuple(sorted(v for v in _brute_int(nums) if 0 < v <= 100))
    assert _reachable_int(tuple(sorted(nums)), "+-*/", 100) == want


def test_levels_are_tasks_and_the_mixture_draws_each():
    assert [t.name for t in COUNTDOWN_LEVELS] == [
        "countdown",
        "countdown_n3_99_addsub",
        "countdown_n3_99_all",
        "countdown_n4_99_all",
        "countdown_n5_99_all",
    ]
    rng = random.Random(0)
    seen = {LEVELS.sample(rng).task for _ in range(200)}
    assert seen == {t.name for t in COUNTDOWN_LEVELS}  # each problem keeps its level's name
    n5 = get_task("countdown_n5_99_all").sample(rng)
    assert len(n5.fields["nums"]) == 5 and 1 <= n5.fields["target"] <= 100
    # the corpus never sees a problem held out for the TinyZero set or any level
    ex = excluded("countdown_levels")
    for name in ("countdown_tinyzero_100", "countdown", "countdown_n4_99_all"):
        assert {get_task(name).canonical(p) for p in heldout(name, 50)} <= ex


def test_strategy_order_by_hand():
    # 13, 7, 5 -> 22. Stage 1: +/- largest first (7+5-13, the largest subtracted last, goes
    # negative); stage 2: a product or quotient of two, then +/-; stage 3: (a+-b)*c or /c.
    # A product the rest cannot bring back down is never tried: 13*7=91 > 22+5,
    # (13-7)*5=30 > 22+0; 7*5=35 <= 22+13 is.
    p = TZ100.make([5, 13, 7], 22)
    cands, order = SEARCH_ORDERS.get("strategy")(TZ100, p, random.Random(0), "")
    assert cands == order
    exprs = [c.expr for c in order]
    assert set(exprs[:4]) == {"13+7+5", "13+7-5", "13-7+5", "13-7-5"}
    assert set(exprs[4:6]) == {"7*5+13", "7*5-13"}
    assert exprs[6:] == ["(13+7)/5"]
    assert all(TZ100.verify(TZ100.make([5, 13, 7], c.value), c.expr).correct for c in order)
    # another draw shuffles within each stage only
    other = [c.expr for c in SEARCH_ORDERS.get("strategy")(TZ100, p, random.Random(1), "")[1]]
    assert set(other[:4]) == set(exprs[:4]) and other[6:] == exprs[6:]


def test_strategy_covers_most_real_problems():
    # the share of the real TinyZero rows with a hit among the strategy's candidates
    rows = [json.loads(line) for line in open(real_countdown_path())]
    hits = {3: [], 4: []}
    for r in rows:
        p = TZ100.make(r["nums"], r["target"])
        _, order = SEARCH_ORDERS.get("strategy")(TZ100, p, random.Random(0), "")
        hits[len(r["nums"])].append(any(c.value == r["target"] for c in order))
    assert sum(hits[3]) / len(hits[3]) > 0.90  # measured 0.92
    assert sum(hits[4]) / len(hits[4]) > 0.58  # measured 0.61


_TRY = re.compile(r"([\d+\-*/()]+):(\d+[+\-*/]\d+=\d+(?:,\d+[+\-*/]\d+=\d+)*)\|(\d+),(yes|no)")


def test_named_tries_grammar_and_answers():
    rng = random.Random(3)
    n_sc = 0
    for _ in range(300):
        p = LEVELS.sample(rng)
        t = LEVELS.trace(p, rng, AHA)
        task = get_task(p.task)
        lines = t.split("\n")[1:-2]
        target = str(p.fields["target"])[::-1]
        for line in lines:
            if line.startswith("wait,check:"):
                continue
            m = _TRY.fullmatch(line)
            assert m, line
            expr, steps, shown, _ = m.groups()
            assert shown == target and task.tried_answer(line) == expr
            # the steps compute the named expression, digits least-significant first
            value = int(steps.split(",")[-1].split("=")[1][::-1])
            assert TZ100.verify(TZ100.make(p.fields["nums"], value), expr).correct
        # the answer is the last try's name, so nothing is turned back from reversed digits
        last = [ln for ln in lines if not ln.startswith("wait")][-1]
        assert extract_answer(t) == task.tried_answer(last)
        assert format_reward(p, t) == 1.0
        n_sc += is_self_correction(t)
    assert n_sc > 0


def test_zero_noise_strategy_solves_what_it_covers():
    rng = random.Random(4)
    noise = TraceNoise(0, 0, 0, 0, search_order="strategy", named_tries=True)
    for _ in range(200):
        p = LEVELS.sample(rng)
        task = get_task(p.task)
        _, order = SEARCH_ORDERS.get("strategy")(task, p, random.Random(0), "")
        covered = any(c.value == p.fields["target"] for c in order)
        assert accuracy_reward(p, task.trace(p, rng, noise)) == float(covered)


def test_tried_answer():
    assert TZ100.tried_answer("58+82-4:85+28=041,041-4=631|89,no") == "58+82-4"
    assert TZ100.tried_answer("(13-7)*5:31-7=6,6*5=03|03,yes") == "(13-7)*5"
    assert TZ100.tried_answer("try:58+82-4=136") == "58+82-4"
    assert TZ100.tried_answer("58+82=140,140-4=136|98,no") is None  # unnamed: not readable
    assert TZ100.tried_answer("wait,check:98-136=38,no") is None


def test_tries_rejections_and_check_precision_by_hand():
    p = TZ100.make([58, 82, 4], 136)
    text = (
        "<think>\n"
        "82-58+4:28-85=42,42+4=82|631,yes\n"  # a false hit (28)...
        "wait,check:631-82=801,no\n"  # ...rejected: really wrong
        "58+82+4:85+28=041,041+4=441|631,no\n"
        "58+82-4:85+28=041,041-4=631|631,yes\n"
        "wait,check:631-631=0,no\n"  # a right answer rejected: not a real check
        "58+4+82:85+4=26,26+28=441|631,no\n"
        "</think>\n<answer>58+82-4</answer>"
    )
    assert len(tries(text)) == 4
    assert rejected_tries(text) == [
        "82-58+4:28-85=42,42+4=82|631,yes",
        "58+82-4:85+28=041,041-4=631|631,yes",
    ]
    assert rejections(p, text) == (1, 2)
    assert is_self_correction(text)
    assert ratio_of_sums([(1, 2), (0, 0), (2, 2)]) == 0.75
    assert ratio_of_sums([(0, 0)]) is None
    # a task that cannot read its tries gives no figure
    assert rejections(get_task("countdown").make([13, 7, 5], 15), "no tries") == (0, 0)


def test_unknown_search_order_is_one_line():
    from ahamoment.stages.pretrain import PretrainConfig

    with pytest.raises(Exception, match="unknown search order 'best'"):
        PretrainConfig(search_order="best")
    key = PretrainConfig(search_order="strategy").cache_key()
    assert key != PretrainConfig().cache_key()
