"""Arithmetic: sampling, strict integer answers, loading GSM-style rows, and traces."""

import json
import random
import re

import pytest

from ahamoment.data import DataError
from ahamoment.rewards import accuracy_reward, format_reward
from ahamoment.tasks import Problem, TraceNoise, get_task

AR = get_task("arithmetic")
GSM = "/work/shared/data/gsm8k_test.jsonl"


def _problem(expr: str) -> Problem:
    p = AR.sample(random.Random(0))
    operands = [int(x) for x in re.findall(r"\d+", expr)]
    ops = re.findall(r"[+-]", expr)
    value = operands[0] + sum(n if o == "+" else -n for o, n in zip(ops, operands[1:]))
    return Problem(
        id=expr, task=p.task, question=f"What is {expr}?", answer=str(value),
        fields={"operands": operands, "ops": ops, "expr": expr},
    )  # fmt: skip


def test_sample_is_consistent():
    rng = random.Random(1)
    for _ in range(500):
        p = AR.sample(rng)
        ops, operands = p.fields["ops"], p.fields["operands"]
        assert 2 <= len(operands) <= 3 and all(1 <= n <= 999 for n in operands)
        assert p.question == f"What is {p.fields['expr']}?" == f"What is {AR.canonical(p)}?"
        # independent check of the gold answer
        total = operands[0] + sum(n if o == "+" else -n for o, n in zip(ops, operands[1:]))
        assert p.answer == str(total)


P = _problem("47+38-19")  # = 66


@pytest.mark.parametrize(
    "answer, correct, parsed, reason",
    [
        ("66", True, True, ""),
        ("  66 \n", True, True, ""),
        ("066", True, True, ""),  # int("066") == 66
        ("67", False, True, "value"),
        ("-66", False, True, "value"),
        ("66.0", False, False, "unparseable"),  # integers only, by decision
        ("+66", False, False, "unparseable"),
        ("6 6", False, False, "unparseable"),
        ("1,066", False, False, "unparseable"),
        ("６６", False, False, "unparseable"),  # fullwidth digits
        ("−66", False, False, "unparseable"),  # unicode minus
        ("47+38-19", False, False, "unparseable"),
        ("", False, False, "unparseable"),
        ("9" * 5000, False, False, "unparseable"),  # no int() of a huge string
    ],
)
def test_verify(answer, correct, parsed, reason):
    v = AR.verify(P, answer)
    assert (v.correct, v.parsed, v.reason) == (correct, parsed, reason)


def test_negative_answer():
    p = _problem("12-47")
    assert p.answer == "-35" and AR.verify(p, " -35").correct


def test_bad_gold_never_scores():
    p = _problem("1+1")
    p.answer = "two"
    assert AR.verify(p, "2").reason == "bad gold"


def test_load_gsm8k():
    problems = AR.load_jsonl(GSM)
    assert len(problems) == 1319
    assert problems[0].id == "gsm8k_test_0" and problems[0].answer == "18"
    assert AR.verify(problems[0], "18").correct and AR.canonical(problems[0]).startswith("Janet")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answer": "3"}, "'problem'"),
        ({"problem": "", "answer": "3"}, "'problem'"),
        ({"problem": "q"}, "'answer'"),
        ({"problem": "q", "answer": "3.5"}, "'answer'"),
        ({"problem": "q", "answer": 3.0}, "'answer'"),
    ],
)
def test_load_rejects_bad_rows(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "q", "answer": 3}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        AR.load_jsonl(str(path))


def test_templates():
    t = dict(AR.templates())
    assert t["first operand"](P) == "47" and t["sum of operands"](P) == "104"


def test_trace_exact():
    t = AR.trace(P, random.Random(0), TraceNoise(0, 0, 0, 0))
    assert t == "<think>\n47+38=85,85-19=66\n</think>\n<answer>66</answer>"


def test_trace_slip_and_check():
    # A slip in step 1 then a check: the check line recomputes that step, the rest is redone.
    seen = set()
    for seed in range(200):
        t = AR.trace(P, random.Random(seed), TraceNoise(0, p_false_hit=1, p_check=1, p_drop_tags=0))
        lines = t.split("\n")
        assert lines[-1] == "<answer>66</answer>"
        if lines[2] == "wait,check:47+38=85,no":
            assert lines[3] == "85-19=66"
            seen.add(1)
        else:
            assert lines[2] == "wait,check:85-19=66,no" and lines[1].startswith("47+38=85,")
            seen.add(2)
        assert lines[1] != "47+38=85,85-19=66"  # the first pass is wrong somewhere
    assert seen == {1, 2}


def test_slip_without_check_gives_a_wrong_answer():
    rng = random.Random(0)
    for _ in range(100):
        p = AR.sample(rng)
        t = AR.trace(p, rng, TraceNoise(0, p_false_hit=1, p_check=0, p_drop_tags=0))
        assert accuracy_reward(p, t) == 0.0 and format_reward(p, t) == 1.0


def test_zero_noise_always_correct_and_dropped_tags():
    rng = random.Random(2)
    for _ in range(300):
        p = AR.sample(rng)
        t = AR.trace(p, rng, TraceNoise(0, 0, 0, 0))
        assert accuracy_reward(p, t) == format_reward(p, t) == 1.0
    t = AR.trace(P, rng, TraceNoise(0, 0, 0, p_drop_tags=1))
    assert t == "47+38=85,85-19=66\n66"


def test_loaded_rows_have_no_trace():
    (p,) = [q for q in AR.load_jsonl(GSM)[:1]]
    with pytest.raises(ValueError, match="only generated"):
        AR.trace(p, random.Random(0), TraceNoise())
