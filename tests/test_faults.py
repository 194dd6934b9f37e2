"""kill -9 anywhere in any stage resumes exactly: the fault-injection harness, seven stages.

Each of `aha pretrain`, `aha zero`, `aha sft`, `aha distill generate`, `aha eval` (plain and
with ``--budgets``) and `aha r1` runs at a tiny size through the CLI, is killed with SIGKILL at
seeded points (inside checkpoint writes, JSONL appends and atomic file writes, during the
final evaluation, at random moments), resumed, and compared with an uninterrupted run:
weights and metrics bit for bit, JSONL outputs with no row lost or duplicated, and no
checkpoint loaded that was not whole (see ``fault_harness.py``).

Two tiers, both ``slow`` (so both run in CI): each stage killed once or twice, with a
corrupted checkpoint injected half the time; and the full harness, 10 kills per stage, which
``-m faults`` selects alone and which writes its counts to ``$AHA_FAULTS_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import test_distill
from fault_harness import TINY, Report, Stage, json_file, run_stage, tensors
from test_distill import make_server
from test_r1 import R1_TINY
from test_zero_e2e import PRETRAIN_RESUMABLE, ZERO_TINY, aha

TIMING = ("rollout_tok_s", "train_tok_s", "step_s", "tok_s", "rollout_wait_s", "sync_s")
SFT = [
    "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--warmup", "2", "--save-every", "1",
    "--heldout-n", "4", "--eval-k", "2", "--max-new-tokens", "24", "--no-real-eval",
    "--threads", "1",
]  # fmt: skip
DISTILL = [
    "--api-model", "fake", "--n-prompts", "16", "--samples", "6", "--chunk", "4",
    "--concurrency", "2", "--timeout", "30", "--max-retries", "3", "--backoff", "0.01",
    "--threads", "1",
]  # fmt: skip
EVAL = ["--n", "6", "--k", "2", "--max-new-tokens", "24", "--chunk", "2", "--threads", "1"]
BUDGETS = ["--budgets", "4,8", "--answer-tokens", "8"]


@pytest.fixture(scope="module")
def teacher() -> str:
    """test_distill's chat endpoint on 127.0.0.1, without its faults (their retries count per
    prompt over the server's life, and the reference and every resumed run ask again): 6
    samples per prompt, 3 of which pass the filters, the same for every run."""
    patch = pytest.MonkeyPatch()
    patch.setattr(test_distill, "_fault", lambda question: "none")
    state = SimpleNamespace(
        lock=threading.Lock(), attempts={}, inflight=0, max_inflight=0, delay=0.0, hang=0.0,
        always_fail=set(), max_n=99,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_server(state))
    server.handle_error = lambda request, address: None  # clients killed mid-request
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, teacher) -> dict[str, Path]:
    """The tiny base model, its two-language twin for `aha r1`, and SFT data."""
    d = tmp_path_factory.mktemp("bases")
    aha("pretrain", "--recipe", TINY, "--out", str(d / "base"), "--threads", "1")
    foreign = ["--p-foreign", "0.3", "--out", str(d / "foreign"), "--threads", "1"]
    aha("pretrain", "--recipe", TINY, *foreign)
    rows = [
        {"prompt": f"User: add {i} and 1. Assistant:", "completion": f"{i}+1"} for i in range(24)
    ]
    rows[3] = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "rl.yaml").write_text("prompts_per_step: 2\ngroup_size: 4\nsave_every: 1\n")
    return {"base": d / "base", "foreign": d / "foreign", "data": d / "sft.jsonl", "rl": d / "rl.yaml",
            "teacher": teacher}  # fmt: skip


def _weights(out: Path) -> dict[str, str]:
    return tensors(out / "final" / "model.safetensors")


def stages(b: dict) -> dict[str, Stage]:
    base = str(b["base"])
    return {
        "pretrain": Stage(
            "pretrain",
            lambda out: [*PRETRAIN_RESUMABLE, "--out", str(out)],
            lambda out: {
                "weights": tensors(out / "model.safetensors"),
                "tokenizer": (out / "tokenizer.json").read_text(),
                "meta": json_file(
                    out / "ahamoment_pretrain.json", ("wall_s", "resumed_at_step", "out")
                ),
            },
            lambda out: {},
        ),
        "zero": Stage(
            "zero",
            lambda out: ["zero", "--model", base, *ZERO_TINY, "--out", str(out)],
            lambda out: {
                "weights": _weights(out),
                "summary": json_file(out / "summary.json", ("wall_s", "final")),
                "base_eval": json_file(out / "base_eval.json"),
            },
            lambda out: {"metrics": out / "metrics.jsonl", "samples": out / "samples.jsonl"},
            drop=TIMING,
            resume=("--resume",),
            final_marker=lambda out: out / "final",
        ),
        "sft": Stage(
            "sft",
            lambda out: ["sft", "--data", str(b["data"]), "--model", base, *SFT, "--out", str(out)],
            lambda out: {
                "weights": _weights(out),
                "summary": json_file(out / "summary.json", ("wall_s", "train_s", "train_tok_s")),
            },
            lambda out: {"metrics": out / "metrics.jsonl"},
            drop=TIMING,
            resume=("--resume",),
            final_marker=lambda out: out / "final",
        ),
        "distill-generate": Stage(
            "distill-generate",
            lambda out: [
                "distill",
                "generate",
                "--base-url",
                str(b["teacher"]),
                *DISTILL,
                "--out",
                str(out),
            ],  # fmt: skip
            lambda out: {"stats": json_file(out / "stats.json", ("session_s",))},
            lambda out: {"traces": out / "traces-00000.jsonl", "done": out / "done.jsonl"},
        ),
        "eval": Stage(
            "eval",
            lambda out: ["eval", "--model", base, *EVAL, "--out", str(out)],
            lambda out: {"summary": json_file(out / "summary.json", ("wall_s",))},
            lambda out: {"results": out / "results.jsonl"},
        ),
        "eval-budgets": Stage(
            "eval-budgets",
            lambda out: ["eval", "--model", base, *EVAL, *BUDGETS, "--out", str(out)],
            lambda out: {
                "summary": json_file(out / "summary.json", ("wall_s",)),
                "budgets": json_file(out / "budgets.json", ("wall_s",)),
            },
            lambda out: {"results": out / "results.jsonl"},
        ),
        "r1": Stage(
            "r1",
            lambda out: [
                "r1",
                "--model",
                str(b["foreign"]),
                "--rl-recipe",
                str(b["rl"]),
                *R1_TINY,
                "--out",
                str(out),
            ],  # fmt: skip
            _r1_snapshot,
            _r1_jsonl,
            drop=TIMING,
            final_marker=lambda out: out / "4-final-rl" / "done.json",
        ),
    }


R1_STAGES = ("zero", "1-cold-start", "2-reasoning-rl", "3-rejection-sft", "4-final-rl")


def _r1_snapshot(out: Path) -> dict:
    snap = {"summary": json_file(out / "summary.json", ("wall_s", "stages"))}
    for s in R1_STAGES:
        snap[f"{s}/done"] = json_file(out / s / "done.json", ("stage_s", "train_s", "model"))
        snap[f"{s}/weights"] = _weights(out / s / "train")
    return snap


def _r1_jsonl(out: Path) -> dict[str, Path]:
    files = {"cold_start": out / "1-cold-start" / "cold_start.jsonl"}
    for s in R1_STAGES:
        files[f"{s}/metrics"] = out / s / "train" / "metrics.jsonl"
        files[f"{s}/samples"] = out / s / "train" / "samples.jsonl"
    files["traces"] = out / "3-rejection-sft" / "traces" / "traces-00000.jsonl"
    files["done"] = out / "3-rejection-sft" / "traces" / "done.jsonl"
    return files


NAMES = ["pretrain", "zero", "sft", "distill-generate", "eval", "eval-budgets", "r1"]


def _check(rep: Report) -> None:
    print(json.dumps(rep.as_dict(), indent=1))
    assert rep.kills >= 1 and rep.chains >= 1
    assert not rep.problems, "\n".join(rep.problems[:5])
    assert (rep.lost, rep.duplicated, rep.differing, rep.unreadable) == (0, 0, 0, 0)
    assert (rep.corrupt_loads, rep.partial_visible) == (0, 0)
    assert rep.bit_exact == rep.chains and rep.fallbacks == rep.injected


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_kill_or_two_per_stage_resumes_exactly(name, bases, tmp_path):
    seed = NAMES.index(name)  # a fixed draw per stage: 1 or 2 kills
    rep = run_stage(stages(bases)[name], tmp_path, kills=1 + seed % 2, seed=seed,
                    base_env=dict(os.environ), inject=0.5)  # fmt: skip
    _check(rep)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ten_kills_per_stage_resume_exactly(name, bases, tmp_path):
    rep = run_stage(stages(bases)[name], tmp_path, kills=10, seed=1000 + NAMES.index(name),
                    base_env=dict(os.environ))  # fmt: skip
    if path := os.environ.get("AHA_FAULTS_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(rep.as_dict()) + "\n")
    _check(rep)
