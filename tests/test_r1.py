"""`aha r1`: stage bookkeeping, the cold-start template, and a kill -9 in stage 3 end to end."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from ahamoment.metrics import is_mixed
from ahamoment.rewards import format_reward, judge
from ahamoment.stages.r1 import R1Config, cold_start_data, rl_config, run_stage
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task
from test_zero_e2e import ROOT, TINY, _env, aha


def test_rerun_skips_finished_stages_and_retries_the_killed_one(tmp_path):
    calls: list[str] = []

    def stage(name: str, fail: bool = False):
        def fn(d: Path) -> dict:
            calls.append(name)
            if fail:
                raise KeyboardInterrupt
            return {"model": str(d / "final")}

        return fn

    console = Console(file=io.StringIO())
    run_stage(tmp_path, "1-a", stage("1"), console)
    run_stage(tmp_path, "2-b", stage("2"), console)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "3-c", stage("3", fail=True), console)
    assert not (tmp_path / "3-c" / "done.json").exists()
    assert calls == ["1", "2", "3"]

    calls.clear()
    recs = [run_stage(tmp_path, n, stage(n[0]), console) for n in ("1-a", "2-b", "3-c")]
    assert calls == ["3"]
    assert recs[0]["model"] == str(tmp_path / "1-a" / "final") and "stage_s" in recs[2]


@pytest.mark.parametrize("budget,frac,limit", [(96, 0.75, 72), (128, 0.5, 64)])
def test_cold_start_traces_are_readable_correct_and_fit(
    tmp_path, tiny_tokenizer, budget, frac, limit
):
    cfg = R1Config(
        cold_start_n=60, max_new_tokens=budget, cold_start_max_frac=frac, out=str(tmp_path)
    )
    path = tmp_path / "cold.jsonl"
    facts = cold_start_data(cfg, tiny_tokenizer, path)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == facts["traces"] == 60 and facts["drawn"] >= 60
    task = get_task("countdown")
    for r in rows:
        c = r["completion"]
        assert not is_mixed(c) and "wait,check:" in c and ",yes" in c
        assert len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) <= limit
        q = r["prompt"].split("User: ")[1].split(" Assistant:")[0]
        nums = json.loads(q.split("numbers ")[1].split("]")[0] + "]")
        target = int(q.split("equals ")[1].split(".")[0])
        problem = task.make(nums, target)
        assert format_reward(problem, c) == 1.0 and judge(problem, c)[1].correct


def test_config_checks(tmp_path):
    with pytest.raises(FileNotFoundError):
        R1Config(rl_recipe=str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError):
        R1Config(rl_steps=0)
    with pytest.raises(ValueError):
        R1Config(cold_start_max_frac=0.0)
    with pytest.raises(ValueError):
        R1Config(overlong_buffer=0)
    with pytest.raises(ValueError):
        R1Config(kl_coef=-0.1)
    with pytest.raises(ValueError):
        R1Config(minibatches=0)


def test_the_rl_stages_take_kl_and_overlong_ramp_from_r1_over_the_rl_recipe(tmp_path):
    # r1's budget is its own, so the ramp within it is too: a recipe's longer ramp would cover
    # every token of r1's 128
    recipe = tmp_path / "rl.yaml"
    recipe.write_text(
        "kl_coef: 0.2\noverlong_buffer: 128\nlora_rank: 8\nminibatches: 4\nlr: 2.0e-3\n"
    )
    cfg = R1Config(kl_coef=0.07, overlong_buffer=40, lora_rank=2, rl_recipe=str(recipe))
    zc = rl_config(cfg, ZeroConfig, tmp_path / "base", 5, cfg.rl_reward(), tmp_path / "s")
    assert (zc.kl_coef, zc.overlong_buffer, zc.lora_rank, zc.minibatches) == (0.07, 40, 2, 1)
    assert zc.lr == 2.0e-3  # what r1 leaves to the recipe
    assert (zc.max_new_tokens, zc.steps) == (128, 5)


def test_a_budget_too_short_for_any_trace_says_which_flags_to_raise(tmp_path, tiny_tokenizer):
    cfg = R1Config(cold_start_n=5, max_new_tokens=16, out=str(tmp_path))
    with pytest.raises(RuntimeError, match="--max-new-tokens or --cold-start-max-frac"):
        cold_start_data(cfg, tiny_tokenizer, tmp_path / "cold.jsonl")


def test_every_rl_stage_weighs_format_alike_and_only_2_and_4_add_language():
    cfg = R1Config(format_weight=0.5, language_weight=0.25)
    assert cfg.zero_reward() == "accuracy=1.0,format=0.5"
    assert cfg.rl_reward() == "accuracy=1.0,format=0.5,language=0.25"


R1_TINY = [
    "--zero-steps", "2", "--rl-steps", "2", "--final-rl-steps", "2",
    "--cold-start-n", "16", "--cold-start-epochs", "1", "--sft-batch-size", "8",
    "--cold-start-max-frac", "0.75",  # half of a 64-token budget is too short for a trace
    "--rs-prompts", "12", "--rs-samples", "2", "--rs-epochs", "1",
    "--heldout-n", "6", "--eval-k", "2", "--rl-check-n", "3", "--max-new-tokens", "64",
    "--threads", "1",
]  # fmt: skip


@pytest.mark.slow
def test_r1_killed_in_stage_3_resumes_without_redoing_stages_1_and_2(tmp_path):
    env = _env(tmp_path)
    base = tmp_path / "base"
    aha("pretrain", "--recipe", TINY, "--p-foreign", "0.3", "--out", str(base), "--threads", "1")
    rl_recipe = tmp_path / "rl.yaml"
    rl_recipe.write_text("prompts_per_step: 2\ngroup_size: 4\nsave_every: 1\n")
    run = tmp_path / "run"
    args = ["r1", "--model", str(base), "--rl-recipe", str(rl_recipe), *R1_TINY, "--out", str(run)]

    proc = subprocess.Popen(
        [sys.executable, "-m", "ahamoment.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (run / "3-rejection-sft").exists() and proc.poll() is None:
        assert time.time() < deadline, "stage 3 never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {s: run / s / "done.json" for s in ("zero", "1-cold-start", "2-reasoning-rl")}
    assert all(p.exists() for p in done.values())
    assert not (run / "3-rejection-sft" / "done.json").exists()
    stamps = {s: p.stat().st_mtime_ns for s, p in done.items()}

    res = aha(*args, env=env)
    for s in done:
        assert f"{s}: done, skipped" in res.stdout
        assert done[s].stat().st_mtime_ns == stamps[s]
    assert "3-rejection-sft: done" not in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    for side in ("zero", "r1"):
        for key in ("pass1", "mixing_rate", "format_rate", "mean_len"):
            assert 0 <= summary[side][key] <= (64 if key == "mean_len" else 1)
    assert summary["heldout_n"] == 6
    assert "language-mixing rate" in res.stdout and "R1-Zero" in res.stdout
    s3 = json.loads((run / "3-rejection-sft" / "done.json").read_text())
    assert Path(s3["model"]).is_dir() and (run / "4-final-rl" / "train" / "final").is_dir()
