"""`aha distill generate`: filters by hand, reasoning fields, and a faulty chat endpoint.

The endpoint is a stdlib HTTP server on loopback, written here. It solves each Countdown
question by brute force and answers ``/v1/chat/completions`` with six samples per request:
reasoning in ``reasoning_content``, in ``reasoning``, in a ``<think>`` block, none at all, an
exact duplicate of the first, and a wrong answer; so every prompt keeps exactly 3. Before
answering, it injects one fault per question chosen from the question's hash: a 429, two
5xx, a hung response, malformed JSON, or a truncated body.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from ahamoment import cli
from ahamoment.models import save_model
from ahamoment.stages.distill import DistillConfig, DistillGenerateConfig, distill, distill_generate
from ahamoment.tasks import get_task
from ahamoment.teachers import ChatTeacher, split_reasoning, teacher_sample
from ahamoment.traces import TraceFilters, filter_samples, read_traces

ROOT = Path(__file__).parent.parent
TASK = get_task("countdown")
P = TASK.make([3, 5, 9], 11)  # 9+5-3 = 11


# --- reasoning fields and filters, by hand ---------------------------------------------------
@pytest.mark.parametrize(
    "message, expected",
    [
        ({"reasoning_content": "r1", "reasoning": "r2", "content": "<think>r3</think>x"}, ("r1", "<think>r3</think>x")),
        ({"reasoning": "r2", "content": "<think>r3</think> x"}, ("r2", "<think>r3</think> x")),
        ({"content": "<think> r3 </think>\nx"}, ("r3", "x")),
        ({"reasoning_content": "  ", "content": "x"}, (None, "x")),  # blank is no reasoning
        ({"content": None}, (None, "")),
    ],
)  # fmt: skip
def test_reasoning_is_read_in_the_documented_order(message, expected):
    assert split_reasoning(message) == expected


def _s(reasoning, answer):
    return teacher_sample(reasoning, f"<answer>{answer}</answer>")


def test_each_filter_counts_its_own_rejections():
    samples = [
        _s("9+5=14,14-3=11", "9+5-3"),  # kept
        _s(None, "9+5-3"),  # no_reasoning
        teacher_sample("9+5=14", ""),  # format: no answer at all
        _s("9+3=12", "9+3-5"),  # incorrect (7)
        _s("x" * 100, "9+5-3"),  # too_long (max_chars 80)
        _s("9+5=14,14−3=11 计算", "9+5-3"),  # language: 3 of 16 characters non-ASCII
        _s("9+5=14,14-3=11", "9+5-3"),  # duplicate of the first
        _s("9+5=14,14-3=11.", "9+5-3"),  # near duplicate (one character more)
        _s("5+9=14,14-3=11", "5+9-3"),  # kept: another solution
    ]
    kept, rejected = filter_samples(P, samples, TraceFilters(80, 0.95, 0.9))
    assert [k[1] for k in kept] == ["9+5-3", "5+9-3"]
    assert kept[0][2] == "<think>\n9+5=14,14-3=11\n</think>\n<answer>9+5-3</answer>"
    assert dict(rejected) == dict.fromkeys(
        ["no_reasoning", "format", "incorrect", "too_long", "language", "duplicate", "near_duplicate"], 1
    )  # fmt: skip


# --- the faulty endpoint ---------------------------------------------------------------------
FAULTS = ["none", "429", "5xx", "hang", "malformed", "truncated"]


def _solve(question: str) -> tuple[str, str]:
    nums = [int(x) for x in re.search(r"\[([\d, ]+)\]", question).group(1).split(",")]
    target = int(re.search(r"equals (\d+)", question).group(1))
    for chain in TASK.chains(nums):
        if chain.value == target:
            return chain.expr, ",".join(f"{a}{op}{b}={r}" for a, op, b, r in chain.steps)
    raise AssertionError(question)


def _fault(question: str) -> str:
    return FAULTS[int(hashlib.sha256(question.encode()).hexdigest(), 16) % len(FAULTS)]


def make_server(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, length: int | None = None):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            q = body["messages"][-1]["content"]
            with state.lock:
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
                attempt = state.attempts[q] = state.attempts.get(q, 0) + 1
            try:
                self._answer(body, q, attempt)
            finally:
                with state.lock:
                    state.inflight -= 1

        def _answer(self, body, q, attempt):
            time.sleep(state.delay)
            fault = "5xx" if q in state.always_fail else _fault(q)
            if fault == "429" and attempt == 1:
                return self._send(429, b'{"error": "rate limited"}')
            if fault == "5xx" and (attempt <= 2 or q in state.always_fail):
                return self._send(500 + attempt, b'{"error": "oops"}')
            if fault == "hang" and attempt == 1:
                with state.lock:  # the client gives up after its timeout: no longer its request
                    state.inflight -= 1
                time.sleep(state.hang)
                with state.lock:
                    state.inflight += 1
                return self._send(200, b"{}")
            if fault == "malformed" and attempt == 1:
                return self._send(200, b'{"choices": [{"index": 0, "mess')
            if fault == "truncated" and attempt == 1:
                self._send(200, b'{"choices": [', length=4000)  # then the connection drops
                self.close_connection = True
                return
            expr, steps = _solve(q)
            msgs = [
                {"content": f"<answer>{expr}</answer>", "reasoning_content": steps},
                {"content": f"<answer>{expr}</answer>", "reasoning": f"try {steps}|ok"},
                {"content": f"<think>search:{steps},yes</think>\n<answer>{expr}</answer>"},
                {"content": f"<answer>{expr}</answer>"},  # no reasoning
                {"content": f"<answer>{expr}</answer>", "reasoning_content": steps},  # duplicate
                {"content": "<answer>1+1</answer>", "reasoning_content": "1+1=2"},  # wrong
            ]
            choices = [
                {"index": i, "message": {"role": "assistant", **m}, "finish_reason": "stop"}
                for i, m in enumerate(msgs[: min(body["n"], state.max_n)])
            ]
            self._send(
                200,
                json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode(),
            )

    return Handler


@pytest.fixture
def chat_server():
    state = SimpleNamespace(
        lock=threading.Lock(), attempts={}, inflight=0, max_inflight=0, delay=0.0, hang=3.0,
        always_fail=set(), max_n=99,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_server(state))
    server.handle_error = lambda request, address: None  # writes to clients that hung up
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def _gen_args(url: str, out: Path, n_prompts: int) -> list[str]:
    return [
        "--base-url", url, "--api-model", "fake", "--n-prompts", str(n_prompts),
        "--samples", "6", "--chunk", "4", "--concurrency", "3", "--timeout", "0.5",
        "--max-retries", "3", "--backoff", "0.01", "--out", str(out), "--threads", "1",
    ]  # fmt: skip


def _check_exactly_once(out: Path, n_prompts: int) -> None:
    rows = read_traces(out)
    per_prompt = Counter(r["meta"]["prompt_id"] for r in rows)
    assert len(per_prompt) == n_prompts
    assert set(per_prompt.values()) == {3}  # 6 samples: 3 kept, never a duplicate row
    keys = Counter((r["meta"]["prompt_id"], r["completion"]) for r in rows)
    assert max(keys.values()) == 1
    done = [json.loads(ln) for ln in (out / "done.jsonl").open()]
    assert len(done) == len({d["prompt_id"] for d in done}) == n_prompts
    for r in rows:
        assert set(r) == {
            "prompt",
            "reasoning",
            "answer",
            "completion",
            "teacher",
            "verified",
            "meta",
        }
        assert TASK.verify(TASK.make(*_nums_target(r["meta"]["question"])), r["answer"]).correct


def _nums_target(question: str) -> tuple[list[int], int]:
    nums = [int(x) for x in re.search(r"\[([\d, ]+)\]", question).group(1).split(",")]
    return nums, int(re.search(r"equals (\d+)", question).group(1))


def test_every_fault_is_retried_and_a_dead_prompt_is_reported(chat_server, tmp_path, capsys):
    out = tmp_path / "traces"
    cfg = DistillGenerateConfig(
        base_url=chat_server.url, api_model="fake", n_prompts=18, samples=6, chunk=6,
        concurrency=3, timeout=0.5, max_retries=3, backoff=0.01, out=str(out), threads=1,
    )  # fmt: skip
    from ahamoment.stages.distill import load_prompts

    problems = load_prompts(cfg)
    assert set(FAULTS) - {"none"} <= {_fault(p.question) for p in problems}  # all exercised
    dead = problems[5]
    chat_server.always_fail.add(dead.question)
    stats = distill_generate(cfg)
    assert stats["failed"] == 1 and dead.id in stats["failed_prompts"]
    assert "HTTP 5" in stats["failed_prompts"][dead.id]
    assert chat_server.attempts[dead.question] == 4  # 1 try + 3 retries
    assert chat_server.max_inflight <= 3
    assert stats["prompts_done"] == 17 and stats["accepted"] == 17 * 3
    assert stats["rejected_by"]["no_reasoning"] == 17
    assert stats["rejected_by"]["duplicate"] == 17 and stats["rejected_by"]["incorrect"] == 17
    assert "1 prompts failed" in " ".join(capsys.readouterr().out.split())
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["accepted"] == 51 and on_disk["failed"] == 1
    # the endpoint recovers: a rerun does only the failed prompt
    chat_server.always_fail.clear()
    before = dict(chat_server.attempts)
    stats = distill_generate(cfg)
    assert stats["failed"] == 0 and stats["prompts_done"] == 18
    assert {q for q in chat_server.attempts if chat_server.attempts[q] != before.get(q)} == {
        dead.question
    }
    _check_exactly_once(out, 18)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_keeps_every_prompt_exactly_once(chat_server, tmp_path):
    out = tmp_path / "traces"
    n = 40
    chat_server.delay = 0.05
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ahamoment.stages.distill", "generate", *_gen_args(chat_server.url, out, n)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    done = out / "done.jsonl"
    deadline = time.time() + 60
    while not (done.exists() and len(done.read_text().splitlines()) >= 8):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(done.read_text().splitlines())
    assert n_done < n  # really killed mid-run
    # make the worst case explicit: rows of a prompt without its marker, and a torn last line
    shard = out / "traces-00000.jsonl"
    orphan = {**json.loads(shard.read_text().splitlines()[0]), "meta": {"prompt_id": "orphan"}}
    with shard.open("a") as f:
        f.write(json.dumps(orphan) + "\n" + '{"prompt": "torn')
    with done.open("a") as f:
        f.write('{"prompt_id": "tor')
    chat_server.delay = 0.0
    assert cli.main(["distill-generate", *_gen_args(chat_server.url, out, n)]) == 0
    _check_exactly_once(out, n)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts_done"] == n and stats["accepted"] == 3 * n and stats["failed"] == 0


def test_local_teacher_counts_add_up(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "teacher"
    save_model(tiny_model, tiny_tokenizer, d)
    out = tmp_path / "traces"
    cfg = DistillGenerateConfig(teacher=str(d), n_prompts=6, samples=3, max_new_tokens=24,
                                out=str(out), threads=1)  # fmt: skip
    stats = distill_generate(cfg)
    assert stats["prompts_done"] == 6
    assert stats["accepted"] + stats["rejected"] == 18  # every sample is kept or counted
    assert len(read_traces(out)) == stats["accepted"]


def test_configs_reject_bad_combinations(tmp_path):
    with pytest.raises(ValueError, match="--teacher DIR"):
        DistillGenerateConfig(out="x")
    with pytest.raises(ValueError, match="--api-model"):
        DistillGenerateConfig(out="x", base_url="http://h/v1")
    # the default teacher is the README's `aha zero --out runs/zero-countdown` run: without it,
    # the comparison stops before it builds or writes anything
    with pytest.raises(FileNotFoundError, match="--teacher .*aha zero --out runs/zero-countdown"):
        distill(DistillConfig(teacher=str(tmp_path / "none"), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    assert DistillConfig(teacher="t", seeds="0, 1").seed_list() == [0, 1]


def test_distill_recipes_load():
    from ahamoment import config as cfglib

    for recipe in sorted((ROOT / "recipes").glob("distill-*.yaml")):
        cfglib.build(DistillConfig, recipe, teacher="t")


def test_arm_summary_is_mean_and_spread_over_seeds(capsys):
    from rich.console import Console

    from ahamoment.stages.distill import print_table, summarize_arm

    def run(p1, wall):
        return {"heldout": {"pass1": p1, "greedy_acc": 0.5, "mean_len": 40.0}, "wall_s": wall}

    s = summarize_arm([run(0.4, 100.0), run(0.6, 200.0), run(0.5, 150.0)])
    # mean 0.5; sample sd sqrt(((-0.1)^2 + 0.1^2 + 0) / 2) = 0.1
    assert s["heldout_pass1"]["mean"] == pytest.approx(0.5)
    assert s["heldout_pass1"]["sd"] == pytest.approx(0.1)
    assert s["wall_s"] == {"mean": 150.0, "sd": 50.0}
    print_table({"sft": s, "rl": summarize_arm([run(0.3, 300.0)])}, Console(width=200))
    out = capsys.readouterr().out
    assert "0.500 ± 0.100" in out and "0.300 ± 0.000" in out


def test_a_server_that_ignores_n_is_asked_again_for_the_rest(chat_server):
    import random

    chat_server.max_n = 1  # like the DeepSeek API: one choice whatever n says
    rng = random.Random(0)
    q = next(
        p.question for p in iter(lambda: TASK.sample(rng), None) if _fault(p.question) == "none"
    )
    teacher = ChatTeacher(chat_server.url, "fake", max_retries=0)
    [res] = teacher.sample([q], n=3, seed=0)
    assert res.error is None and res.attempts == 3  # three requests, one choice each
    assert [s.reasoning for s in res.samples] == [_solve(q)[1]] * 3  # choice 0 every time
