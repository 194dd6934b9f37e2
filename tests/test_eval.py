"""`aha eval`: scoring by hand, problem sources, the CLI end to end, and an OpenAI endpoint.

The endpoint is a minimal ``/v1/completions`` server written here (FastAPI + uvicorn, in a
background thread on a free localhost port), serving the tiny model through our sampler. Like
vLLM it cuts a matched stop string from the text and names it in ``stop_reason``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ahamoment import cli
from ahamoment.evaluation import score_problem, summarize
from ahamoment.prompts import prompt_text
from ahamoment.rollout import (
    Completion,
    Request,
    SamplingParams,
    TextRequest,
    ThinkingBudget,
    TorchEngine,
)
from ahamoment.rollout.openai_engine import OpenAIEngine, completion_from_choice
from ahamoment.stages.eval import EvalConfig, load_problems
from ahamoment.tasks import get_task
from tests_support import default_sigint, serve_on_loopback

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "pretrain-tiny.yaml")
COUNTDOWN_ROWS = [  # the real file's shape: `answer` is only the target
    {"id": "a", "problem": "...", "answer": "45", "target": 45, "nums": [30, 71, 88, 2]},
    {"id": "b", "problem": "...", "answer": "33", "target": 33, "nums": [9, 37, 79]},
]


def _s(answer: str | None, think: str = "x") -> Completion:
    """A decoded 10-token completion whose thinking is ``think`` (3 tokens, say)."""
    text = f"<think>\n{think}\n</think>\n" + (
        f"<answer>{answer}</answer>" if answer is not None else ""
    )
    return Completion(ids=list(range(10)), logprobs=[], finish_reason="stop", text=text, think=3)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- scoring by hand ------------------------------------------------------------------------
def test_cons_at_k_votes_on_normalised_answers():
    p = get_task("countdown").make([5, 9, 15], 19)  # 15+9-5 = 19 is right, 5+9+15 = 29 wrong
    rec = score_problem(p, [_s("5+9+15"), _s("15 + 9 - 5"), _s("15+9-5")])
    # normalised, "15+9-5" has 2 votes against 1: the vote is right. Unnormalised, the three
    # answers would tie at 1 and the first ("5+9+15", wrong) would win.
    assert rec["answers"] == ["5+9+15", "15+9-5", "15+9-5"]
    assert rec["cons"] is True
    assert rec["pass1"] == pytest.approx(2 / 3, abs=1e-15) and rec["passk"] == 1.0


@pytest.mark.parametrize(
    ("answers", "cons"),
    [
        # 2-2 tie after normalisation: the answer seen first wins
        (["5+9+15", "15+9-5", " 5 + 9+15", "15 +9-5 "], False),
        (["15+9-5", "5+9+15", "15 +9-5 ", " 5 + 9+15"], True),
        # a missing answer never votes; an unparsable one ("hello") votes like any answer,
        # and here wins the 1-1 tie by coming first
        ([None, None, "hello", "15+9-5"], False),
        ([None, "15+9-5", "hello", None], True),
    ],
)
def test_cons_at_k_ties_go_to_the_first_answer(answers, cons):
    p = get_task("countdown").make([5, 9, 15], 19)
    rec = score_problem(p, [_s(a) for a in answers])
    assert rec["cons"] is cons


def test_pass_at_k_parse_failures_and_summary_by_hand():
    p = get_task("countdown").make([5, 9, 15], 19)
    # 1 correct of 4, one missing answer, one unparsable ("hello")
    a = score_problem(p, [_s("15-5+9"), _s(None), _s("hello"), _s("5+9+15")], greedy=_s("5+9+15"))
    # 0 correct of 4, all parsed; greedy right
    b = score_problem(p, [_s("5+9+15")] * 4, greedy=_s("9+15-5"))
    assert (a["pass1"], a["passk"], a["parsed"]) == (0.25, 1.0, [True, False, False, True])
    assert (b["pass1"], b["passk"], b["cons"]) == (0.0, 0.0, False)
    assert a["cons"] is True  # votes: "15-5+9", "hello", "5+9+15" 1 each: the first wins
    settings = {"temperature": 0.6, "top_p": 0.95, "n": 4, "k": 4}
    s = summarize([a, b], settings)
    assert s["pass1"] == 0.125  # (1/4 + 0) / 2
    assert s["passk"] == 0.5  # (1 + 0) / 2: pass@4 from 4 samples is "any correct"
    assert s["consk"] == 0.5
    assert s["greedy_acc"] == 0.5  # a's greedy wrong, b's right
    assert s["parse_fail_rate"] == 0.25  # 2 of 8 samples
    assert s["format_rate"] == 0.875  # only the sample without <answer> is unformatted
    assert s["mean_len"] == 10 and s["n"] == 2 and s["k"] == 4 and s["settings"] == settings
    assert s["mean_think"] == 3 and s["truncated_rate"] == 0.0
    assert s["reflection_rate"] == 0.0 and s["step_accuracy"] is None  # "x": no step


def test_reasoning_figures_of_the_summary_by_hand():
    p = get_task("countdown").make([5, 9, 15], 19)
    samples = [
        # two steps, both right; a rejecting check, then another try: a self-correction
        _s("15+9-5", "5+9=14,14|19,no\nwait,check:19-14=5,no\n15+9=24,24-5=19,yes"),
        # one wrong step (9+5=15), a check that accepts: reflection, no self-correction
        _s("9+5+15", "9+5=15,15|19,no\nwait,check:19-19=0,yes"),
        # no reflection; one foreign symbol (language.py) makes the reasoning mixed
        _s("15+9-5", "15+9=24,24-5=19 \uff1d"),
    ]
    s = summarize([score_problem(p, samples)], {"k": 3})
    assert s["reflection_rate"] == 2 / 3
    assert s["self_correction_rate"] == 1 / 3
    # steps: 5+9=14, 19-14=5, 15+9=24, 24-5=19 | 9+5=15 (wrong), 19-19=0 | 15+9=24, 24-5=19
    assert s["step_accuracy"] == 7 / 8
    assert s["mixing_rate"] == 1 / 3
    assert s["pass1"] == 2 / 3


def test_pass_at_k_is_the_unbiased_estimator_when_k_samples_of_more():
    # score_problem reports pass@k at k = samples; the estimator is metrics.pass_at_k, whose
    # hand values live in test_metrics.py. Here: c=1 of n=4 gives pass@4 = 1 and pass@1 = 1/4.
    p = get_task("countdown").make([5, 9, 15], 19)
    rec = score_problem(p, [_s("5+9+15"), _s("5+9+15"), _s("9+15-5"), _s("5+9+15")])
    assert (rec["pass1"], rec["passk"], rec["n_correct"]) == (0.25, 1.0, 1)


# --- problem sources ------------------------------------------------------------------------
def test_countdown_rows_use_the_verifier_not_the_answer_field(tmp_path):
    path = _write(tmp_path / "cd.jsonl", COUNTDOWN_ROWS)
    problems, source = load_problems(EvalConfig(data=path, n=0))
    assert [p.task for p in problems] == ["countdown_tinyzero"] * 2 and "countdown" in source
    a = problems[0]
    assert a.id == "a" and a.fields == {"nums": [30, 71, 88, 2], "target": 45}
    # echoing `answer` (the target) scores nothing; an expression over the numbers does
    rec = score_problem(a, [_s("45"), _s("88-71+30-2"), _s("(88-71)*2+30-19")])
    assert rec["correct"] == [False, True, False]  # 17+30-2 = 45; 19 is not a given number
    assert rec["parsed"] == [True, True, True]


def test_problem_answer_rows_go_to_the_math_task(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"problem": "What is 6*7?", "answer": "42"}])
    [p], _ = load_problems(EvalConfig(data=path))
    assert p.task == "math"
    math = pytest.importorskip("ahamoment.tasks.math")
    assert prompt_text(p).endswith(f"User: What is 6*7? {math.MATH_PROMPT_SUFFIX} Assistant:")
    assert score_problem(p, [_s("\\boxed{42}"), _s("41")])["correct"] == [True, False]


def test_bad_sources_are_clear_errors(tmp_path):
    odd = _write(tmp_path / "odd.jsonl", [{"question": "?", "solution": "1"}])
    with pytest.raises(ValueError, match="nums and target .* problem and answer"):
        load_problems(EvalConfig(data=odd))
    dup = _write(tmp_path / "dup.jsonl", [COUNTDOWN_ROWS[0], COUNTDOWN_ROWS[0]])
    with pytest.raises(ValueError, match="unique"):
        load_problems(EvalConfig(data=dup))
    held, source = load_problems(EvalConfig(task="arithmetic", n=5))
    assert len(held) == 5 and source == "arithmetic held-out"


def test_config_rejects_budgets_without_a_local_torch_model():
    with pytest.raises(ValueError, match="budget forcing"):
        EvalConfig(base_url="http://localhost:1/v1", budgets="8")
    with pytest.raises(ValueError, match="budget forcing"):
        EvalConfig(engine="hf", min_think=4)
    with pytest.raises(ValueError, match="min_think"):
        EvalConfig(budgets="4,16", min_think=8)
    assert EvalConfig(budgets="64, 16,32,16").budget_list() == [16, 32, 64]
    assert EvalConfig().max_tokens(16) == 16 + 32  # budget + answer_tokens
    assert EvalConfig().max_tokens(None) == 128  # max_new_tokens


# --- the CLI end to end -----------------------------------------------------------------------
def aha(*args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ahamoment.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


EVAL_TINY = [
    "eval", "--pretrain-recipe", TINY, "--n", "6", "--k", "2", "--max-new-tokens", "24",
    "--chunk", "2", "--threads", "1", "--budgets", "4,8", "--answer-tokens", "8",
]  # fmt: skip


@pytest.mark.slow
def test_aha_eval_on_the_default_model_prints_the_table_and_resumes(tmp_path):
    env = {**os.environ, "AHAMOMENT_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "run"
    res = aha(*EVAL_TINY, "--out", str(out), env=env)
    assert "building it" in res.stdout  # the embedded default, built on first use
    for label in ("pass@1 (mean of k)", "cons@2", "pass@2", "greedy accuracy", "parse-fail"):
        assert label in res.stdout
    assert "T=0.6, top-p=0.95, n=6, k=2" in res.stdout
    assert "Accuracy against the thinking budget" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("pass1", "consk", "passk", "greedy_acc", "parse_fail_rate"):
        assert 0 <= summary[key] <= 1, key
    assert 0 < summary["mean_len"] <= 24 and (summary["n"], summary["k"]) == (6, 2)
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
    curve = json.loads((out / "budgets.json").read_text())["runs"]
    assert [r["settings"]["max_think"] for r in curve] == [None, 4, 8]
    assert curve[1]["mean_think"] <= 4 and curve[1]["settings"]["max_new_tokens"] == 12
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 18  # 6 problems x (plain + 2 budgets)
    for rec in map(json.loads, lines):
        if rec["budget"] == 4:  # max budget forcing: thinking ends at token 4 at the latest
            assert all(t <= 4 for t in rec["think"])

    # a run cut after its first chunk and resumed writes exactly the same records
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    res = aha(*EVAL_TINY, "--out", str(out), env=env)
    assert "resuming: 2/18 done" in res.stdout
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "summary.json").read_text())["pass1"] == summary["pass1"]


@pytest.mark.slow
def test_ctrl_c_keeps_finished_chunks(tmp_path):
    env = {**os.environ, "AHAMOMENT_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    aha("pretrain", "--recipe", TINY, "--threads", "1", env=env)
    args = [*EVAL_TINY[:-4], "--n", "60", "--chunk", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ahamoment.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=default_sigint,
    )
    results = tmp_path / "run" / "results.jsonl"
    deadline = time.time() + 60
    while not (results.exists() and results.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, "finished before Ctrl-C"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same `aha eval` again to resume" in stdout
    kept = [json.loads(x) for x in results.read_text().splitlines()]  # every line whole
    assert 2 <= len(kept) < 60
    res = aha(*args, env=env)
    assert f"resuming: {len(kept)}/60 done" in res.stdout
    assert len(results.read_text().splitlines()) == 60


# --- an OpenAI-compatible endpoint --------------------------------------------------------------
def make_app(model, tokenizer, served: list):
    from fastapi import FastAPI

    app = FastAPI()
    engine = TorchEngine(model, tokenizer)
    lock = threading.Lock()  # one generation at a time on the shared model
    eos = tokenizer.eos_token_id

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "t"}]}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = prompt
        stops = tuple(body.get("stop") or ())
        stop_ids = tuple(body.get("stop_token_ids") or (eos,))
        params = SamplingParams(
            body["temperature"], body["top_p"], 0, body["max_tokens"], stop_ids, stops
        )
        seed = body.get("seed")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        with lock:
            [cs] = engine.generate([Request(ids, params, body.get("n", 1))], gen)
        choices = []
        for i, c in enumerate(cs):
            text = tokenizer.decode([t for t in c.ids if t != eos])
            served.append(text)
            hit = [s for s in stops if c.finish_reason == "stop" and s in text]
            if hit:  # like vLLM and OpenAI: the stop string is cut from the text
                text = text[: text.index(hit[0])]
            tokens = [tokenizer.decode([t]) for t in c.ids]
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": hit[0] if hit else None,
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": c.logprobs,
                        "top_logprobs": None,
                        "text_offset": [0] * len(tokens),
                    },
                }
            )
        n_out = sum(len(c.ids) for c in cs)
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": 0},
        }

    return app


@pytest.fixture(scope="module")
def endpoint(tiny_model, tiny_tokenizer):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")

    served: list[str] = []
    with serve_on_loopback(make_app(tiny_model, tiny_tokenizer, served)) as url:
        yield SimpleNamespace(url=f"{url}/v1", served=served)


def test_openai_engine_token_and_text_prompts_match_our_sampler(
    endpoint, tiny_model, tiny_tokenizer
):
    tok = tiny_tokenizer
    prompt = tok("User: hi. Assistant:", add_special_tokens=False)["input_ids"]
    params = SamplingParams(0.0, 1.0, 0, 12, (tok.eos_token_id,))
    [[local]] = TorchEngine(tiny_model, tok).generate([Request(prompt, params)])
    want = tok.decode([t for t in local.ids if t != tok.eos_token_id])
    remote = OpenAIEngine(None, None, base_url=endpoint.url)  # asks the server for its model
    assert remote.model == "tiny"
    by_text_params = SamplingParams(0.0, 1.0, 0, 12)  # the server's own EOS stops it
    [[by_ids, copy], [by_text]] = remote.generate(
        [Request(prompt, params, n=2), TextRequest(tok.decode(prompt), by_text_params)]
    )
    for c in (by_ids, copy, by_text):
        assert c.text == want and c.ids == [] and c.finish_reason == local.finish_reason
        assert c.logprobs == pytest.approx(local.logprobs, abs=1e-5)  # same model, same math
    # sampled requests with a generator are reproducible (the server honours `seed`)
    sampled = [TextRequest("User: hi", SamplingParams(1.0, 0.9, 0, 8), n=3)]
    a = remote.generate(sampled, torch.Generator().manual_seed(1))
    b = remote.generate(sampled, torch.Generator().manual_seed(1))
    assert [c.text for c in a[0]] == [c.text for c in b[0]]
    tb = ThinkingBudget(4, (4,), (5,), max_think=2)
    with pytest.raises(NotImplementedError, match="torch engine only"):
        remote.generate([TextRequest("x", SamplingParams(budget=tb))])


def test_stop_string_cut_by_a_server_is_put_back():
    params = SamplingParams(stop=("</answer>",))

    def choice(text, reason, **extra):
        return SimpleNamespace(text=text, finish_reason=reason, logprobs=None, model_extra=extra)

    c = completion_from_choice(choice("<answer>1", "stop", stop_reason="</answer>"), params)
    assert (c.text, c.finish_reason) == ("<answer>1</answer>", "stop")
    # the server says the model ended on EOS (vLLM: stop_reason None): nothing to put back
    assert completion_from_choice(choice("<answer>1", "stop", stop_reason=None), params).text == (
        "<answer>1"
    )
    # a server that says nothing, one stop string: it is put back
    assert completion_from_choice(choice("<answer>1", "stop"), params).text == "<answer>1</answer>"
    assert completion_from_choice(choice("<answer>1", "length"), params).text == "<answer>1"


def test_aha_eval_against_an_openai_compatible_server(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns otherwise
    out = tmp_path / "run"
    before = len(endpoint.served)
    argv = ["eval", "--base-url", endpoint.url, "--api-model", "tiny", "--n", "3", "--k", "2"]
    argv += ["--max-new-tokens", "16", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "tiny @ http://127.0.0.1" in stdout and "pass@1 (mean of k)" in stdout
    assert "T=0.6, top-p=0.95, n=3, k=2" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n"], summary["k"]) == (3, 2) and 0 < summary["mean_len"] <= 16
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["samples"]) == 2 and "greedy" in r for r in recs)
    # what was graded is what the server wrote (3 problems x (2 samples + 1 greedy))
    assert len(endpoint.served) - before == 9
    graded = {t for r in recs for t in [*r["samples"], r["greedy"]]}
    assert graded <= set(endpoint.served[before:])
    # an unknown model name is a clear error
    argv[argv.index("tiny")] = "nope"
    assert cli.main([*argv[:-1], str(tmp_path / "other")]) == 2
    assert "does not serve 'nope'" in capsys.readouterr().out
