"""End to end through the real `aha` CLI: pretrain, zero, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests_support import default_sigint

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "pretrain-tiny.yaml")
TIMING = {"rollout_tok_s", "train_tok_s", "step_s", "rollout_wait_s", "sync_s"}
ZERO_TINY = [
    "--steps", "4", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24",
    "--heldout-n", "6", "--eval-k", "2", "--eval-every", "2", "--eval-n", "3",
    "--no-real-eval", "--threads", "1", "--save-every", "1", "--minibatches", "2",
]  # fmt: skip


PRETRAIN_RESUMABLE = [
    "pretrain", "--recipe", TINY, "--threads", "1", "--tokens", "60000", "--save-every", "3",
]  # fmt: skip
"""A tiny pretraining that checkpoints every 3 steps: long enough to kill mid-run."""


def aha(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ahamoment.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "AHAMOMENT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_pretrain_then_zero_through_the_cli(tiny_base, tmp_path):
    meta = json.loads((tiny_base / "ahamoment_pretrain.json").read_text())
    assert meta["corpus_docs"] == 600 and 0 < meta["corpus_accuracy"] < 1
    run = tmp_path / "run"
    res = aha("zero", "--model", str(tiny_base), *ZERO_TINY, "--out", str(run))
    assert "Held-out 6 problems" in res.stdout and "pass@1" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    for side in ("base", "trained"):
        for key in ("greedy_acc", "pass1", "passk", "format_rate", "mean_len", "reflection_rate"):
            assert 0 <= summary[side][key] <= (128 if key == "mean_len" else 1)
    assert summary["heldout_n"] == 6 and 0 <= summary["template_baseline"] <= 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval/pass1" in rows[1] and "reward/accuracy" in rows[0] and "reward/format" in rows[0]
    assert (run / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]


@pytest.mark.slow
def test_readme_recipe_runs_through_the_cli(tiny_base, tmp_path):
    # The README's main job on a tiny budget: its recipe trains LoRA adapters with a KL anchor,
    # and final/ is a plain model (adapters merged: test_lora.py checks the merge itself).
    run = tmp_path / "run"
    recipe = str(ROOT / "recipes" / "zero-countdown.yaml")
    aha("zero", "--recipe", recipe, "--model", str(tiny_base), *ZERO_TINY, "--out", str(run))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    want = yaml.safe_load(Path(recipe).read_text())
    assert want["lora_rank"] > 0 and want["kl_coef"] > 0  # adapters and an anchor, as said
    assert (cfg["lora_rank"], cfg["kl_coef"], cfg["steps"]) == (
        want["lora_rank"],
        want["kl_coef"],
        4,
    )
    final = load_file(str(run / "final" / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    assert final.keys() == base.keys()  # no adapter weights left over
    assert all(final[k].shape == base[k].shape for k in base)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("kl" in r for r in rows)
    assert (run / "checkpoints" / "step-4" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_zero_builds_the_default_model_on_first_use_and_caches_it(tmp_path):
    env = _env(tmp_path)
    args = ["zero", "--pretrain-recipe", TINY, *ZERO_TINY, "--steps", "1"]
    first = aha(*args, "--out", str(tmp_path / "a"), env=env)
    assert "building it" in first.stdout
    models = _built(tmp_path / "cache" / "models")
    assert len(models) == 1 and models[0].name.startswith("countdown-")
    second = aha(*args, "--out", str(tmp_path / "b"), env=env)
    assert "building it" not in second.stdout
    assert _built(tmp_path / "cache" / "models") == models


def _built(models: Path) -> list[Path]:
    """The model directories in a cache (the build locks beside them left out)."""
    return sorted(p for p in models.iterdir() if p.is_dir())


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_and_resumed_run_equals_uninterrupted(tiny_base, tmp_path, sig):
    args = ["zero", "--model", str(tiny_base), *ZERO_TINY, "--steps", "6"]
    straight = tmp_path / "straight"
    aha(*args, "--out", str(straight))

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "ahamoment.cli", *args, "--out", str(broken)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step-2").exists():
        assert proc.poll() is None, "run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not (broken / "summary.json").exists()
    aha(*args, "--out", str(broken), "--resume")

    assert _rows(broken) == _rows(straight)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(broken / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_model(tmp_path):
    base = PRETRAIN_RESUMABLE
    straight = tmp_path / "straight"
    aha(*base, "--out", str(straight))

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "ahamoment.cli", *base, "--out", str(broken)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_point = tmp_path / "broken.tmp" / "resume.pt"
    deadline = time.time() + 120
    while not resume_point.exists():
        assert proc.poll() is None, "pretraining ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    assert not (broken / "config.json").exists()
    aha(*base, "--out", str(broken))
    meta = json.loads((broken / "ahamoment_pretrain.json").read_text())
    assert meta["resumed_at_step"] and meta["resumed_at_step"] % 3 == 0
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(broken / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
