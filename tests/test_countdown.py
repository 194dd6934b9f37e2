"""Countdown: problem space, sampling, loading real rows, the verifier and the trace grammar."""

import itertools
import json
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from ahamoment.data import DataError
from ahamoment.metrics import is_self_correction
from ahamoment.rewards import accuracy_reward, extract_answer, format_reward
from ahamoment.tasks import TraceNoise, get_task
from ahamoment.tasks.countdown import Countdown

REAL = "/work/shared/data/countdown_3to4_sample.jsonl"
CD = get_task("countdown")
TZ = get_task("countdown_tinyzero")


@pytest.mark.parametrize(
    "task, expected",
    [
        (CD, 10_894),
        (Countdown("t", (3,), 1, 9, "+-"), 550),  # these match FINDINGS.md's table
        (Countdown("t", (4,), 1, 9, "+-"), 2_717),
        (Countdown("t", (3,), 1, 15, "+-"), 2_424),
        (Countdown("t", (3,), 1, 9, "+-*"), 1_973),
        (Countdown("t", (3, 4), 1, 9, "+-"), 550 + 2_717),  # mixing forms adds the spaces
    ],
)
def test_count_space(task, expected):
    assert task.count_space() == expected


def test_count_space_refuses_huge_spaces():
    with pytest.raises(NotImplementedError):
        TZ.count_space()


def test_reachable_by_hand():
    # 13,7,5 with +-: 25, 13+7-5=15, 13-7+5=11, 7+5-13=-1 (dropped), 13-7-5=1
    assert CD.reachable((5, 7, 13)) == (1, 11, 15, 25)
    # 2,3,4 with all ops: 4*3*2=24, (4+2)/3=2, ... just spot-check some members
    assert {24, 2, 9, 20, 14, 10} <= set(TZ.reachable((2, 3, 4)))


def test_sample_question_and_fields():
    p = CD.make([13, 7, 5], 15)
    assert p.question == (
        "Using the numbers [13, 7, 5], create an equation that equals 15. "
        "You can use + and - and each number must be used exactly once."
    )
    assert (p.answer, p.fields, p.task) == ("15", {"nums": [13, 7, 5], "target": 15}, "countdown")
    assert CD.canonical(p) == "5,7,13->15"
    assert "You can use +, -, * and / and" in TZ.make([1, 2, 3], 6).question


def test_targets_uniform_over_distinct_values():
    # Numbers 5,5,5 reach 15 (one way) and 5 (three ways); each target must come up half
    # the time, not 1/4 vs 3/4 as drawing over expressions would give.
    rng = random.Random(0)
    task = Countdown("t", (3,), 5, 5, "+-")
    counts = Counter(task.sample(rng).fields["target"] for _ in range(2000))
    assert set(counts) == {5, 15}
    assert abs(counts[5] - 1000) < 120  # binomial sd is about 22


def test_samples_are_in_range_and_solvable():
    rng = random.Random(1)
    for _ in range(200):
        p = TZ.sample(rng)
        assert len(p.fields["nums"]) in (3, 4)
        assert all(1 <= n <= 99 for n in p.fields["nums"])
        assert 1 <= p.fields["target"] <= 1000
        assert p.fields["target"] in TZ.reachable(tuple(sorted(p.fields["nums"])))


def _solve(nums):
    """Independent brute force: any binary tree over the numbers, fully bracketed."""
    items = [(Fraction(n), str(n)) for n in nums]

    def go(items):
        if len(items) == 1:
            yield items[0]
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ea), (b, eb) = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            options = [(a + b, f"({ea}+{eb})"), (a - b, f"({ea}-{eb})"), (a * b, f"({ea}*{eb})")]
            if b != 0:
                options.append((a / b, f"({ea}/{eb})"))
            for opt in options:
                yield from go([*rest, opt])

    return go(items)


def test_real_rows_load_and_brute_force_solutions_verify():
    problems = TZ.load_jsonl(REAL)
    assert len(problems) == 1024
    assert Counter(len(p.fields["nums"]) for p in problems) == {3: 540, 4: 484}
    assert problems[0].id == "countdown_test_0" and problems[0].task == "countdown_tinyzero"
    for p in problems[:200]:
        target = p.fields["target"]
        expr = next(e for v, e in _solve(p.fields["nums"]) if v == target)
        assert TZ.verify(p, expr).correct, (p.fields, expr)
        assert TZ.verify(p, f"{expr} = {target}").correct
        assert not TZ.verify(p, str(target)).correct  # echoing the target never scores


@pytest.mark.parametrize(
    "row, message",
    [
        ({"target": 3}, "'nums'"),
        ({"nums": [1, 2], "target": "3"}, "'target'"),
        ({"nums": [1, "2"], "target": 3}, "'nums'"),
        ({"nums": [1, 2.0], "target": 3}, "'nums'"),
        ({"nums": [5], "target": 5}, "'nums'"),
        ({"nums": [1, True], "target": 3}, "'nums'"),
    ],
)
def test_load_rejects_bad_rows(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        CD.load_jsonl(str(path))


def test_load_default_id(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('\n{"nums": [1, 2], "target": 3}\n')
    (p,) = CD.load_jsonl(str(path))
    assert p.id == f"{path}:2" and p.task == "countdown"


P = CD.make([13, 7, 5], 15)
PZ = TZ.make([13, 7, 5], 56)


@pytest.mark.parametrize(
    "task, problem, answer, correct, parsed, reason",
    [
        (CD, P, "7-5+13", True, True, ""),
        (CD, P, " 13 + 7 - 5 ", True, True, ""),
        (CD, P, "13-(5-7)", True, True, ""),  # brackets are fine with +-
        (CD, P, "7-5+13=15", True, True, ""),  # '= number' is ignored
        (CD, P, "7-5+13=16", True, True, ""),  # only the left side is graded
        (CD, P, "15", False, True, "numbers"),  # echo the target
        (CD, P, "13+7-5+0", False, True, "numbers"),  # an extra number
        (CD, P, "13+7", False, True, "numbers"),  # a number missing
        (CD, P, "13+7-7", False, True, "numbers"),  # a number used twice
        (CD, P, "13+7+5", False, True, "value"),
        (CD, P, "(13-5)*7", False, False, "unparseable"),  # * is not a countdown op
        (CD, P, "-5+7+13", False, False, "unparseable"),  # no unary minus
        (CD, P, "13+7−5", False, False, "unparseable"),  # unicode minus
        (CD, P, "１３+7-5", False, False, "unparseable"),  # fullwidth digits
        (CD, P, "", False, False, "unparseable"),
        (CD, P, "13+7-5==15", False, False, "unparseable"),
        (CD, P, "15=13+7-5", False, False, "unparseable"),
        (CD, P, "2**99999", False, False, "unparseable"),
        (TZ, PZ, "(13-5)*7", True, True, ""),
        (TZ, PZ, "7*(13-5)", True, True, ""),
        (TZ, PZ, "13*7/5", False, True, "value"),
        (TZ, PZ, "7/(13-13)*5", False, True, "division by zero"),
        (TZ, PZ, "13**7-5", False, False, "unparseable"),
    ],
)
def test_verify(task, problem, answer, correct, parsed, reason):
    v = task.verify(problem, answer)
    assert (v.correct, v.parsed, v.reason) == (correct, parsed, reason)


def test_verify_never_credits_a_bad_gold():
    p = CD.make([13, 7, 5], 15)
    p.fields["target"] = "15"
    assert CD.verify(p, "7-5+13").reason == "bad gold"


def test_templates():
    names = [name for name, _ in CD.templates()]
    assert names == ["s0+s1+s2", "s0+s1-s2", "s0-s1+s2", "s0-s1-s2"]
    answers = {name: fn(P) for name, fn in CD.templates()}
    assert answers["s0+s1-s2"] == "13+7-5" and CD.verify(P, answers["s0+s1-s2"]).correct
    tz = dict(TZ.templates())
    assert tz["product"](PZ) == "13*7*5" and tz["s0-s1-s2-s3"](PZ) == ""  # wrong count


def test_normalize():
    assert CD.normalize(" 13 + 7 -\t5 ") == "13+7-5"


def test_chains_by_hand():
    # (13-5)*7: the flat expression needs brackets to keep the chain's value 56.
    chains = {c.expr: c for c in TZ.chains([13, 5, 7])}
    assert chains["(13-5)*7"].steps == ((13, "-", 5, 8), (8, "*", 7, 56))
    assert "13-5*7" not in chains  # a chain is never written without its brackets
    assert "5-13+7" not in chains  # negative intermediate 5-13 is skipped
    assert "13/5*7" not in chains  # 13/5 is not exact
    assert "13*5/7" not in chains
    assert all(TZ.verify(TZ.make([13, 5, 7], c.value), e).correct for e, c in chains.items())
    # 3 distinct numbers, +-: 6 orders x 4 op pairs = 24, minus negative intermediates.
    assert len(CD.chains([13, 7, 5])) == sum(
        all(r >= 0 for r in itertools.accumulate([a, s1 * b, s2 * c]))
        for a, b, c in itertools.permutations([13, 7, 5])
        for s1 in (1, -1)
        for s2 in (1, -1)
    )


_LINE = re.compile(r"(?:wait,check:)?\d+[+\-*/]\d+=\d+(?:,\d+[+\-*/]\d+=\d+)*\|\d+,(?:yes|no)")


def test_trace_exact_example():
    rng = random.Random(3)
    p = CD.make([13, 7, 5], 15)
    t = CD.trace(p, rng, TraceNoise(0, 0, 0, 0))
    assert t.startswith("<think>\n") and t.endswith("</answer>")
    lines = t.split("\n")
    assert lines[-2:] == ["</think>", f"<answer>{extract_answer(t)}</answer>"]
    assert all(_LINE.fullmatch(line) for line in lines[1:-2])
    assert lines[-3].endswith(",yes") and all(line.endswith(",no") for line in lines[1:-3])
    assert format_reward(p, t) == 1.0 and accuracy_reward(p, t) == 1.0


def test_zero_noise_traces_are_always_correct():
    rng = random.Random(4)
    for _ in range(300):
        p = CD.sample(rng)
        t = CD.trace(p, rng, TraceNoise(0, 0, 0, 0))
        assert format_reward(p, t) == 1.0 and accuracy_reward(p, t) == 1.0, t


def test_noisy_corpus_statistics():
    # Default noise; measured 42.8% correct and well formed, 89.4% format (seed 1).
    rng = random.Random(1)
    n, good, fmt, waits, lines_ok = 2000, 0, 0, 0, 0
    for _ in range(n):
        p = CD.sample(rng)
        t = CD.trace(p, rng, TraceNoise())
        f = format_reward(p, t)
        fmt += f
        good += f * accuracy_reward(p, t)
        waits += "wait,check:" in t
        lines_ok += all(_LINE.fullmatch(x) for x in t.split("\n")[:-1] if not x.startswith("<"))
    assert 0.35 < good / n < 0.50
    assert 0.87 < fmt / n < 0.93  # 1 - p_drop_tags, binomial sd 0.7%
    assert 0.05 < waits / n < 0.25
    assert lines_ok == n


def test_check_lines():
    # Always claim a false hit and always check: every miss is called a hit (its arithmetic
    # still right), a 'wait,check:..,no' line repeats the last step and rejects it, and the
    # search goes on to a true hit.
    rng = random.Random(5)
    noise = TraceNoise(p_give_up=0, p_false_hit=1, p_check=1, p_drop_tags=0)
    p = CD.make([13, 7, 5], 15)
    t = CD.trace(p, rng, noise)
    lines = t.split("\n")[1:-2]
    assert len(lines) >= 4  # this seed tries three misses before the hit
    for claim, check in zip(lines[:-2:2], lines[1:-2:2]):
        last = claim.split(",")[-2]  # "a+b=r|target"
        a, op, b, written = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)\|15", last).groups()
        true = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert claim.endswith(",yes") and int(written) == true != 15
        assert check == f"wait,check:{a}{op}{b}={true}|15,no"
    assert lines[-1].startswith("wait,check:") and lines[-1].endswith(",yes")
    assert accuracy_reward(p, t) == 1.0


def test_check_by_difference_subtracts_the_smaller_of_result_and_target():
    # Same seed and noise as test_check_lines: the same tries and verdicts, but each check line
    # is |result - target| written larger-first, and only a zero difference says yes.
    noise = TraceNoise(p_give_up=0, p_false_hit=1, p_check=1, p_drop_tags=0)
    p = CD.make([13, 7, 5], 15)
    plain = CD.trace(p, random.Random(5), noise).split("\n")
    noise.check_by_difference = True
    lines = CD.trace(p, random.Random(5), noise).split("\n")
    assert len(lines) == len(plain) and lines[1::2] == plain[1::2]  # the tries are unchanged
    checks = [ln for ln in lines if ln.startswith("wait,check:")]
    assert len(checks) >= 2
    for claim, check in zip(lines[1:-2:2], lines[2:-2:2]):
        r = int(re.search(r"=(\d+)\|15,yes$", claim).group(1))
        hi, lo = max(r, 15), min(r, 15)
        verdict = "yes" if r == 15 else "no"
        assert check == f"wait,check:{hi}-{lo}={hi - lo},{verdict}"
    assert checks[-1] == "wait,check:15-15=0,yes"
    assert accuracy_reward(p, "\n".join(lines)) == 1.0


def test_false_hit_without_check_answers_the_wrong_chain():
    rng = random.Random(6)
    noise = TraceNoise(p_give_up=0, p_false_hit=1, p_check=0, p_drop_tags=0)
    for _ in range(50):
        p = CD.sample(rng)
        t = CD.trace(p, rng, noise)
        lines = t.split("\n")
        assert len(lines) == 4 and lines[1].endswith(",yes")
        # arithmetic is right; the claim is what slipped, unless the first try truly hit
        last = lines[1].split(",")[-2]  # "a+b=r|target"
        a, op, b, r = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)\|\d+", last).groups()
        assert int(r) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert CD.verify(p, lines[-1][8:-9]).correct == (int(r) == p.fields["target"])


def test_dropped_tags():
    rng = random.Random(7)
    p = CD.make([13, 7, 5], 15)
    t = CD.trace(p, rng, TraceNoise(0, 0, 0, p_drop_tags=1))
    assert "<" not in t and CD.verify(p, t.split("\n")[-1]).correct
    assert format_reward(p, t) == 0.0


def test_trace_is_deterministic_given_the_rng():
    p = CD.make([13, 7, 5], 15)
    assert CD.trace(p, random.Random(9), TraceNoise()) == CD.trace(
        p, random.Random(9), TraceNoise()
    )


TZ100 = get_task("countdown_tinyzero_100")


def test_tinyzero_100_targets_match_the_real_rows():
    rng = random.Random(11)
    for _ in range(200):
        p = TZ100.sample(rng)
        assert 1 <= p.fields["target"] <= 100 and len(p.fields["nums"]) in (3, 4)
        assert all(1 <= n <= 99 for n in p.fields["nums"])
    # every real row's target is reachable in this form (they were generated that way)
    for p in TZ100.load_jsonl(REAL)[:200]:
        assert p.fields["target"] in TZ100.reachable(tuple(sorted(p.fields["nums"])))


def test_reachable_with_all_four_operators_by_hand():
    got = set(TZ.reachable((2, 3, 4)))
    # 2*3*4, (2+3)*4, (3+4)*2, 2+3+4, 3*4/2, 4/2-... (4-3)*2, (3+2)-4
    assert {24, 20, 14, 9, 6, 2, 1} <= got
    assert max(got) == 24 and 23 not in got
    assert TZ.reachable((1, 1)) == (1, 2)  # 1*1 = 1/1 = 1, 1+1 = 2; 1-1 = 0 is not positive


def test_search_ops_and_recalled_target():
    # Tries over "+-" only, verdicts without "|target"; a check line compares adjacently.
    rng = random.Random(12)
    noise = TraceNoise(
        p_give_up=0, p_false_hit=1, p_check=1, p_drop_tags=0, search_ops="+-", inline_target=False
    )
    p = TZ100.make([13, 7, 5], 15)
    t = TZ100.trace(p, rng, noise)
    lines = t.split("\n")[1:-2]
    tries = [ln for ln in lines if not ln.startswith("wait")]
    checks = [ln for ln in lines if ln.startswith("wait")]
    assert all(re.fullmatch(r"(\d+[+-]\d+=\d+,)+(yes|no)", x) for x in tries)
    # every try is called a hit (p_false_hit 1) and checked; misses are rejected, search goes on
    assert len(checks) == len(tries) >= 2
    assert all(re.fullmatch(r"wait,check:\d+[+-]\d+=\d+\|15,no", c) for c in checks[:-1])
    assert checks[-1].endswith("|15,yes")
    assert format_reward(p, t) == 1.0 and accuracy_reward(p, t) == 1.0


def test_new_corpus_fields_keep_old_cache_keys():
    from ahamoment.stages.pretrain import PretrainConfig

    # a field added later leaves the keys of models built without it alone: the previous
    # embedded default (recompute checks) keeps its key, and the current one has its own
    assert PretrainConfig(check_by_difference=False).cache_key() == "countdown-c1b238eb41f6"
    assert PretrainConfig().cache_key() == "countdown-549cd6949ce8"
    assert PretrainConfig(search_ops="+-").cache_key() != PretrainConfig().cache_key()
    assert PretrainConfig(inline_target=False).cache_key() != PretrainConfig().cache_key()


def test_guess_first_traces():
    # Always check, never give up: guesses are claimed, computed (reversed digits) and rejected
    # until one hits; each rejection is a self-correction by metrics.is_self_correction.
    rng = random.Random(13)
    noise = TraceNoise(
        p_give_up=0,
        p_check=1,
        p_drop_tags=0,
        search_ops="+-",
        guess_first=True,
        reversed_digits=True,
    )
    p = TZ100.make([58, 82, 4], 136)  # 58+82-4 and its reorderings hit
    t = TZ100.trace(p, rng, noise)
    lines = t.split("\n")[1:-2]
    guesses, checks = lines[0::2], lines[1::2]
    assert len(guesses) == len(checks) >= 2  # this seed misses first
    assert all(re.fullmatch(r"try:\d+[+-]\d+[+-]\d+=136", g) for g in guesses)
    assert all(
        re.fullmatch(r"wait,check:\d+[+-]\d+=\d+,\d+[+-]\d+=\d+\|631,no", c) for c in checks[:-1]
    )
    assert checks[-1].endswith("|631,yes") and accuracy_reward(p, t) == 1.0
    # the check computes the guessed chain: 58+82=140 is written 85+28=041
    assert ("85+28=041" in checks[-1]) == guesses[-1].startswith("try:58+82")
    assert is_self_correction(t)
    # never check: the first guess is the answer, unverified
    t0 = TZ100.trace(p, random.Random(13), TraceNoise(p_check=0, p_drop_tags=0, guess_first=True))
    lines0 = t0.split("\n")
    assert len(lines0) == 4 and lines0[1].startswith("try:") and not is_self_correction(t0)
