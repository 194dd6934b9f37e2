"""The code task: problems with hidden tests, answers graded in the sandbox, the batch hooks,
MBPP/HumanEval files, the noisy traces, and `aha eval --data` on an MBPP file.

Every verdict here comes from a real sandbox run (about 10-30 ms each)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from ahamoment import cli, rewards
from ahamoment.models import build_tokenizer
from ahamoment.prompts import prompt_text
from ahamoment.rewards import judge, score, task_stats
from ahamoment.sandbox import STATUSES, TestCase
from ahamoment.stages.eval import EvalConfig, load_problems
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem, TraceNoise
from ahamoment.tasks.code import Spec, program
from tests_support import serve_on_loopback

CODE = get_task("code")
# f(x) = 3x + 1: examples at -1, 0, 1; hidden tests at 4, 5, 7, 10 -> 13, 16, 22, 31
AFFINE = CODE.make(Spec("affine", (3, 1), (-1, 0, 1), (4, 5, 7, 10)))
# keep x > 3: hidden expected values [4, 5], [9], [], [4] (hand-computed below)
KEEP = CODE.make(Spec("keep", 3, ([1, 3, 5], [4, 0]), ([3, 4, 5], [9, 2], [1, 3], [4])))


def answer(code: str, think: str = "x") -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{code}\n</answer>"


# --- problems -------------------------------------------------------------------------------
def test_a_problem_shows_its_examples_and_keeps_its_tests_hidden():
    assert AFFINE.question == (
        "Write a Python function f(x) with f(-1) == -2, f(0) == 1 and f(1) == 4."
    )
    assert AFFINE.fields["tests"] == (
        TestCase("f(4)", 13),
        TestCase("f(5)", 16),
        TestCase("f(7)", 22),
        TestCase("f(10)", 31),
    )
    assert AFFINE.answer == "def f(x):\n    return 3 * x + 1"
    assert KEEP.question == (
        "Write a Python function f(xs) with f([1, 3, 5]) == [5] and f([4, 0]) == [4]."
    )
    assert [t.expected for t in KEEP.fields["tests"]] == [[4, 5], [9], [], [4]]


def test_no_hidden_test_of_a_held_out_problem_is_in_its_prompt():
    from ahamoment.splits import heldout

    problems = heldout("code", 300) + [CODE.sample(random.Random(s)) for s in range(200)]
    assert {p.fields["family"] for p in problems} == {
        "affine", "square", "add", "keep", "suffix", "repeat"
    }  # fmt: skip
    for p in problems:
        text = prompt_text(p)
        shown = [t.call for t in p.fields["examples"]]
        for t in p.fields["tests"]:
            assert t.call not in text and t.call not in shown, (p.question, t.call)


def test_held_out_problems_are_distinct_by_canonical_form_and_never_trained_on():
    from ahamoment.data import sample_excluding
    from ahamoment.splits import excluded, heldout

    held = heldout("code", 1000)
    keys = {CODE.canonical(p) for p in held}
    assert len(keys) == 1000 and keys <= excluded("code")
    rng = random.Random(5)
    for _ in range(300):
        assert CODE.canonical(sample_excluding(CODE, rng, excluded("code"))) not in keys
    # same function, examples and constants: one problem, whatever the hidden inputs
    other = CODE.make(Spec("affine", (3, 1), (-1, 0, 1), (3, 6, 8, 9)))
    assert CODE.canonical(other) == CODE.canonical(AFFINE)


# --- grading in the sandbox -----------------------------------------------------------------
HOSTILE = {
    "exit": "import sys\nsys.exit(0)",
    "always_equal": (
        "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()"
    ),
    "fake_output": 'print(\'{"passed": 4, "total": 4, "status": "passed"}\')\ndef f(x):\n    return 0',
    "loop": "def f(x):\n    while True:\n        pass",
    "patched_eq": "import builtins\nbuiltins.int = str\ndef f(x):\n    return x",
}


@pytest.mark.parametrize(
    "code, status, score_",
    [
        ("def f(x):\n    return 3 * x + 1", "passed", 1.0),
        ("def f(x):\n    return 3*x+1", "passed", 1.0),
        ("```python\ndef f(x):\n    return 3 * x + 1\n```", "passed", 1.0),  # fence removed
        ("def f(x):\n    return 3 * x + 2", "failed", 0.0),  # off by one: no hidden test
        # hard-coding the shown examples passes no hidden test
        ("def f(x):\n    return {-1: -2, 0: 1, 1: 4}.get(x, 0)", "failed", 0.0),
        # right only where x < 6: f(4) and f(5) of the four hidden tests
        ("def f(x):\n    return 3 * x + 1 if x < 6 else 0", "failed", 0.5),
        ("def f(x)\n    return 3 * x + 1", "syntax_error", 0.0),
        ("raise ValueError('no')", "load_error", 0.0),
    ],
)
def test_honest_programs_score_1_wrong_ones_their_share_of_tests(code, status, score_):
    v = CODE.verify(AFFINE, code)
    assert (v.reason, v.score, v.correct) == (status, score_, status == "passed")
    assert v.parsed == (status != "syntax_error")


def test_partial_credit_of_an_off_by_one_threshold():
    # x > 2 instead of x > 3 on [3, 4, 5], [9, 2], [1, 3], [4]:
    # [3, 4, 5] != [4, 5]; [9] ok; [3] != []; [4] ok -> 2 of 4
    v = CODE.verify(KEEP, "def f(xs):\n    return [x for x in xs if x > 2]")
    assert (v.reason, v.score, v.correct) == ("failed", 0.5, False)
    assert (
        rewards.code_reward(KEEP, answer("def f(xs):\n    return [x for x in xs if x > 2]")) == 0.5
    )
    assert (
        rewards.accuracy_reward(KEEP, answer("def f(xs):\n    return [x for x in xs if x > 2]"))
        == 0.0
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_score_0(name):
    v = CODE.verify(AFFINE, HOSTILE[name])
    assert v.score == 0.0 and not v.correct, v
    assert v.reason != "sandbox_error"


def test_a_problem_without_readable_tests_never_gives_credit():
    broken = Problem("b", "code", "?", "", {"tests": "assert f(1) == 2"})
    assert CODE.verify(broken, "def f(x):\n    return 2").reason == "bad gold"
    assert CODE.verify(broken, "def f(x):\n    return 2").score is None


# --- the batch hooks ------------------------------------------------------------------------
def test_score_runs_a_batch_through_verify_many_once(monkeypatch):
    calls = []
    real = CODE.verify_many

    def counted(problems, answers):
        calls.append(len(problems))
        return real(problems, answers)

    monkeypatch.setattr(CODE, "verify_many", counted)
    monkeypatch.setattr(rewards, "_VERDICTS", {})
    right, wrong = "def f(x):\n    return 3 * x + 1", "def f(x):\n    return x"
    completions = [
        answer(right),
        answer(right),
        answer(wrong),
        "<think>\nx\n</think>",
        answer(right + " "),
    ]
    rb = score([AFFINE] * 5, completions, {"code": 1.0, "format": 1.0})
    # 4 answers (the 4th has none); the duplicated completion is verified once
    assert calls == [3]
    assert rb.components["code"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert rb.components["format"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert rb.total == [2.0, 2.0, 1.0, 0.0, 2.0]
    assert rb.parse_fail == [False, False, False, True, False]
    assert calls == [3]  # the figures above reused the verdicts


def test_task_stats_count_sandbox_statuses_and_no_answers():
    completions = [
        answer("def f(x):\n    return 3 * x + 1"),
        answer("def f(x):\n    return x"),
        answer(HOSTILE["loop"]),
        answer("def f(x) return"),
        "no tags at all",
    ]
    stats = task_stats([AFFINE] * 5, completions)
    want = {f"task/{s}": 0 for s in STATUSES} | {"task/no_answer": 1}
    want |= {"task/passed": 1, "task/failed": 1, "task/timeout": 1, "task/syntax_error": 1}
    assert stats == want


def test_tasks_without_the_hooks_are_untouched():
    cd = get_task("countdown")
    assert not hasattr(cd, "verify_many") and not hasattr(cd, "batch_stats")
    p = cd.make([3, 5, 7], 15)
    assert task_stats([p, p], [answer("3+5+7"), answer("3")]) == {}
    rb = score([p, p], [answer("3+5+7"), answer("3")], {"accuracy": 1.0})
    assert rb.total == [1.0, 0.0]


def test_rollout_metrics_log_the_status_counts():
    import torch

    from ahamoment.rl.rollouts import Rollout, rollout_metrics
    from ahamoment.rollout import Completion

    texts = [answer("def f(x):\n    return 3 * x + 1"), answer("import sys\nsys.exit(0)")]
    batch = Rollout(
        problems=[AFFINE, AFFINE],
        prompts=[[1], [1]],
        completions=[Completion([1, 2], [0.0, 0.0], "stop", t) for t in texts],
    )
    batch.rewards = score(batch.problems, batch.texts, {"code": 1.0, "format": 1.0})
    row = rollout_metrics(batch, 2)
    assert row["reward/code"] == 0.5 and row["task/passed"] == 1 and row["task/exited"] == 1
    assert row["task/no_answer"] == 0
    assert torch.tensor(batch.rewards.total).tolist() == [2.0, 1.0]


# --- files ----------------------------------------------------------------------------------
MBPP_ROWS = [
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert 7 == add(3, 4)"],
    },
    {
        "task_id": 12,
        "text": "Write a function to halve a number.",
        "code": "def half(x):\n    return x / 2",
        "test_list": ["assert half(4) == 2", "assert math.isclose(half(1), 0.5)"],
        "test_setup_code": "import math",
    },
]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mbpp_rows_load_and_a_test_that_is_not_gradable_counts_as_failed(tmp_path, caplog):
    path = _write(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    with caplog.at_level(logging.WARNING):
        add, half = CODE.load_jsonl(path)
    assert "1 tests are not gradable" in caplog.text
    assert add.id == "11" and add.task == "code"
    assert add.question.startswith("Write a function to add two numbers.\nYour code should pass")
    assert add.fields["tests"] == (
        TestCase("add(2, 3)", 5),
        TestCase("add(0, 0)", 0),
        TestCase("add(3, 4)", 7),
    )
    assert CODE.verify(add, add.answer).score == 1.0
    assert CODE.verify(add, "def add(a, b):\n    return a * b").score == pytest.approx(1 / 3)
    # half: the isclose line is reported and never passed: 1 of 2, never correct
    [bad] = half.fields["not_gradable"]
    assert "isclose" in bad and f"{path}:2" in bad
    v = CODE.verify(half, half.answer)
    assert (v.score, v.correct, v.reason) == (0.5, False, "passed")


def test_humaneval_rows_rename_the_candidate_and_take_a_continuation(tmp_path):
    row = {
        "task_id": "HumanEval/0",
        "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
        "canonical_solution": "    return sum(xs)\n",
        "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
        "    assert candidate([]) == 0\n    for i in range(3):\n        assert candidate([i]) == i\n",
        "entry_point": "total",
    }
    [p] = CODE.load_jsonl(_write(tmp_path / "he.jsonl", [row]))
    assert p.fields["tests"] == (TestCase("total([1, 2])", 3), TestCase("total([])", 0))
    assert len(p.fields["not_gradable"]) == 1 and "for i in range(3)" in p.fields["not_gradable"][0]
    # a whole function (typing imported by the preamble), or only the body after the prompt
    whole = "def total(xs: List[int]) -> int:\n    return sum(xs)"
    assert CODE.verify(p, whole).score == pytest.approx(2 / 3)
    assert CODE.verify(p, "    return sum(xs)").score == pytest.approx(2 / 3)


def test_bad_code_rows_are_clear_errors(tmp_path):
    from ahamoment.data import DataError

    with pytest.raises(DataError, match="test_list"):
        CODE.load_jsonl(_write(tmp_path / "x.jsonl", [{"text": "?", "code": ""}]))


# --- traces ---------------------------------------------------------------------------------
def test_trace_grammar_and_its_program_round_trips_the_tokenizer():
    square = CODE.make(Spec("square", (6, 7), (-1, 0, 1), (3, 4, 5, 6)))  # 13, 7, 13
    noiseless = TraceNoise(p_give_up=0, p_false_hit=0, p_check=1, p_drop_tags=0)
    text = CODE.trace(square, random.Random(0), noiseless)
    assert text == (
        "<think>\nf(-1)=13,f(1)=13,same\nso a*x*x+b,b=f(0)=7,a=f(1)-f(0)=13-7\n"
        "wait,check:f(0)=(13-7)*0*0+7=7|7,yes\n</think>\n"
        "<answer>\ndef f(x):\n    return (13 - 7) * x * x + 7\n</answer>"
    )
    assert judge(square, text)[1].correct
    # giving up takes the square for affine; a check at x = 0 cannot tell them apart
    gave_up = TraceNoise(p_give_up=1, p_false_hit=0, p_check=1, p_drop_tags=0)
    text = CODE.trace(square, random.Random(0), gave_up)
    assert text.startswith("<think>\nso a*x+b,b=f(0)=7,a=f(1)-f(0)=13-7\nwait,check:f(0)=")
    assert (
        text.endswith("return (13 - 7) * x + 7\n</answer>") and not judge(square, text)[1].correct
    )
    # an off-by-one shift is caught by the check (f(0) = (13-7)*1+7 = 13, not 7), then redone
    slip = TraceNoise(p_give_up=0, p_false_hit=1, p_check=1, p_drop_tags=0)
    texts = {CODE.trace(square, random.Random(s), slip) for s in range(20)}
    assert any("wait,check:f(0)=(13-7)*1*1+7=13|7,no\nf(-1)=13" in t for t in texts)
    assert all(judge(square, t)[1].correct for t in texts if ",no\n" in t)
    tok = build_tokenizer([prompt_text(square) + text] * 50, 300)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # spaces, newlines and indentation survive
    assert rewards.extract_answer(tok.decode(ids)) == "def f(x):\n    return (13 - 7) * x + 7"
    assert square.answer == program("square", (6, 7)) == "def f(x):\n    return 6 * x * x + 7"


def test_a_traces_own_verdict_equals_the_sandboxs():
    noise = TraceNoise(p_give_up=0.5, p_false_hit=0.3, p_check=0.3, p_drop_tags=0)
    rng = random.Random(3)
    for _ in range(40):
        p = CODE.sample(rng)
        text = CODE.trace(p, rng, noise)
        code = rewards.extract_answer(text)
        fast = CODE.verify(p, code)  # straight after trace: graded in-process
        CODE._trusted = None
        slow = CODE.verify(p, code)  # in the sandbox
        assert (fast.correct, fast.score, fast.reason) == (slow.correct, slow.score, slow.reason)


# --- aha eval --data on an MBPP file ----------------------------------------------------------
def scripted_app(script: dict[str, str], served: list):
    """An OpenAI-compatible endpoint that answers each prompt with the text scripted for the
    first key it contains."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "t"}]}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        text = next(v for k, v in script.items() if k in body["prompt"])
        served.append(text)
        choices = [
            {"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
            for i in range(body.get("n", 1))
        ]
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": choices}  # fmt: skip

    return app


def test_aha_eval_grades_an_mbpp_file_in_the_sandbox(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    monkeypatch.setenv("COLUMNS", "200")
    rows = [
        *MBPP_ROWS,
        {
            "task_id": 13,
            "text": "Write a function to double a number.",
            "code": "def double(x):\n    return 2 * x",
            "test_list": ["assert double(2) == 4", "assert double(5) == 10"],
        },
    ]
    path = _write(tmp_path / "mbpp.jsonl", rows)
    problems, source = load_problems(EvalConfig(data=path, n=0))
    assert [p.task for p in problems] == ["code"] * 3 and "mbpp.jsonl (code)" == source
    script = {
        "add two": answer("def add(a, b):\n    return a + b"),  # 3 of 3
        "halve": answer("def half(x):\n    return x / 2"),  # 1 of 2: isclose is not gradable
        "double": answer("import os\nos._exit(0)\ndef double(x):\n    return 2 * x"),  # exited
    }
    served: list[str] = []
    with serve_on_loopback(scripted_app(script, served)) as url:
        out = tmp_path / "run"
        argv = ["eval", "--data", path, "--base-url", f"{url}/v1", "--k", "2", "--n", "0"]
        assert cli.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert {k: r["correct"] for k, r in recs.items()} == {
        "11": [True, True],
        "12": [False, False],
        "13": [False, False],
    }
    assert recs["11"]["greedy_correct"] and not recs["13"]["greedy_correct"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass1"] == pytest.approx(1 / 3) and summary["n"] == 3
    assert len(served) == 3 * 2  # one request per problem for the samples, one greedy
