"""Several processes equal one: `aha zero` and `aha sft` under torchrun (gloo, CPU).

The 2-process runs go through the real CLI under ``torch.distributed.run``; the 1-process runs
call the stage in this process with the same global batch. Rollouts must be identical (same
seed blocks), and losses and final weights equal up to the order of float additions: a rank
sums its share of the tokens, DDP adds the two shares (and divides by 2, undone by the factor
W in the loss), while one process adds all tokens in one pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ahamoment import config as cfglib
from ahamoment.distributed import Ranks, mix_seed, seed_blocks
from ahamoment.models import save_model
from ahamoment.rl.rollouts import default_seed_block
from ahamoment.stages.sft import SFTConfig, sft
from ahamoment.stages.zero import ZeroConfig, zero

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent

# fp32 sums in another order differ by ~1e-7 relative. Metrics (loss, KL, grad norm...) are
# compared with rtol 1e-5 (measured: at most 6e-7 apart). Weights: Adam divides each gradient
# by its own running scale, so a parameter with a near-zero gradient turns float noise into a
# visible step; measured at most 3.4e-6 (zero, lr 1e-2, 3 steps) and 7e-7 (sft). The bound
# 2e-5 is still 500x below one step's size (~lr = 1e-2): rows trained twice or missing, or
# other rollouts, move weights by far more. Adam does not see a constant factor on the
# gradient, so a wrong W factor shows in the loss and grad norm (2x), which are compared
# (checked by breaking the factor in sft.py: the test fails).
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
WEIGHT_ATOL = 2e-5

# 3 GRPO steps: 4 prompts x 4 samples, 2 minibatches (so old-policy log-probs and a shuffled
# minibatch order are exercised), the k2 KL to a reference, and a length reward so that the
# random tiny model gets non-zero advantages. seed_block 2 = P / 2: two blocks, one per rank.
ZERO = dict(
    steps=3, prompts_per_step=4, group_size=4, max_new_tokens=12, heldout_n=2, eval_k=1,
    eval_every=0, real_eval=False, threads=1, save_every=2, keep_checkpoints=5, minibatches=2,
    seed_block=2, reward="reward_plugin:length_penalty=1.0,format=0.1", lr=1e-2, warmup=1,
)  # fmt: skip
# stream=False: under DDP `aha sft` lays sequences out in rows (runs_as_stream), so the
# one-process run does too; the stream's agreement with the rows is tests/test_sft.py's
SFT = dict(
    epochs=1, batch_size=8, lr=1e-2, warmup=1, heldout_n=0, threads=1, save_every=0, pack=True,
    stream=False,
)  # fmt: skip


def _flags(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def torchrun(nproc: int, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m ahamoment.cli ARGS``, one thread each."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "AHAMOMENT_CACHE": str(tmp / "cache"),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "ahamoment.cli", *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if res.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
        )
    return res


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> str:
    d = tmp_path_factory.mktemp("dist") / "model"
    save_model(tiny_model, tiny_tokenizer, d)
    return str(d)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _max_weight_diff(a: Path, b: Path) -> float:
    wa = load_file(str(a / "model.safetensors"))
    wb = load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _assert_close_rows(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> float:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    worst = 0.0
    for r1, r2 in zip(one, two):
        for k in keys:
            assert r2[k] == pytest.approx(r1[k], rel=LOSS_RTOL, abs=LOSS_ATOL), (r1["step"], k)
            worst = max(worst, abs(r1[k] - r2[k]))
    return worst


# --- the pieces, by hand ----------------------------------------------------------------------
def test_pieces_are_contiguous_and_cover_everything():
    # 10 items over 4 ranks: 10 = 4*2 + 2, so ranks 0 and 1 get 3, ranks 2 and 3 get 2
    pieces = [Ranks(r, 4).piece(10) for r in range(4)]
    assert [list(p) for p in pieces] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert list(Ranks(1, 4).piece(2)) == [1] and list(Ranks(3, 4).piece(2)) == []
    assert Ranks().gather("x") == ["x"] and Ranks().sum([1, 2.5]) == [1.0, 2.5]


def test_seed_blocks_and_the_default_block():
    assert seed_blocks(6, 2) == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ValueError, match="must divide"):
        seed_blocks(6, 4)
    # P=16: one process decodes all 16 together; 2 -> 8 each; 3 -> 4 (4 blocks over 3 ranks)
    assert [default_seed_block(16, w) for w in (1, 2, 3, 16, 32)] == [16, 8, 4, 1, 1]
    # stable across runs (a fixed value), distinct for neighbours
    assert mix_seed(0, 0, 1, 0) == mix_seed(0, 0, 1, 0) != mix_seed(0, 0, 1, 1)
    assert mix_seed(0, 0, 1, 0) < 2**63
    with pytest.raises(ValueError, match="seed_block"):
        ZeroConfig(prompts_per_step=4, seed_block=3)


# --- end to end: 2 processes against 1 ----------------------------------------------------------
@pytest.mark.slow
def test_zero_two_processes_equal_one_and_resume_on_one(tiny_dir, tmp_path):
    two = tmp_path / "two"
    torchrun(2, "zero", "--model", tiny_dir, *_flags(ZERO), "--out", str(two), tmp=tmp_path)
    one = tmp_path / "one"
    zero(ZeroConfig(model=tiny_dir, out=str(one), **ZERO))

    # the same rollouts: samples (text, reward) and every rollout metric are exactly equal
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()
    r1, r2 = _rows(one), _rows(two)
    for a, b in zip(r1, r2):
        for k in ("reward", "accuracy", "len_mean", "format_rate", "constant_groups"):
            assert a[k] == b[k], k
    worst = _assert_close_rows(r1, r2, ("loss", "kl", "entropy", "grad_norm", "clip_frac"))
    w = _max_weight_diff(one / "final", two / "final")
    print(f"zero 1 vs 2 processes: max metric diff {worst:.3g}, max weight diff {w:.3g}")
    assert w <= WEIGHT_ATOL
    assert r1[-1]["loss"] != r1[0]["loss"]  # the steps did train (a non-trivial comparison)
    # rank 0 alone wrote: one copy of each row and checkpoint
    assert len(r2) == ZERO["steps"]
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-2"]

    # resume the 2-process checkpoint of step 2 with 1 process: it must reach the same weights
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    for name in ("config.yaml", "base_eval.json", "metrics.jsonl", "samples.jsonl"):
        shutil.copy(two / name, cut / name)
    zero(ZeroConfig(model=tiny_dir, out=str(cut), resume=True, **ZERO))
    w_resumed = _max_weight_diff(one / "final", cut / "final")
    print(f"zero resumed (2 -> 1 process) vs 1 process: max weight diff {w_resumed:.3g}")
    assert w_resumed <= WEIGHT_ATOL
    assert [r["step"] for r in _rows(cut)] == [1, 2, 3]
    _assert_close_rows(r1, _rows(cut), ("loss", "kl", "grad_norm"))


def _sft_data(tmp_path: Path, n: int = 16) -> str:
    rows = [
        {"prompt": f"User: add {i} and {i % 5}. Assistant:", "completion": f"<think>{i}+{i % 5}"
         + "=" * (i % 7) + f"</think><answer>{i + i % 5}</answer>"}
        for i in range(n)
    ]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_sft_two_processes_equal_one(tiny_dir, tmp_path):
    data = _sft_data(tmp_path)  # 16 rows of different lengths, 2 steps of 8
    two = tmp_path / "two"
    torchrun(2, "sft", "--data", data, "--model", tiny_dir, *_flags(SFT), "--out", str(two),
             tmp=tmp_path)  # fmt: skip
    one = tmp_path / "one"
    sft(SFTConfig(data=data, model=tiny_dir, out=str(one), **SFT))
    r1, r2 = _rows(one), _rows(two)
    assert len(r1) == 2
    worst = _assert_close_rows(r1, r2, ("loss", "grad_norm"))
    w = _max_weight_diff(one / "final", two / "final")
    print(f"sft 1 vs 2 processes: max metric diff {worst:.3g}, max weight diff {w:.3g}")
    assert w <= WEIGHT_ATOL
    assert r1[1]["loss"] < r1[0]["loss"]


ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_are_what_accelerate_launch_reads(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    cfg = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise
    args = launch_command_parser().parse_args(["train.py"])
    # nested settings become launch arguments (fsdp_config.x -> --fsdp_x): each must exist
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(cfg, section) or {}:
            name = key if section != "fsdp_config" or key.startswith("fsdp") else "fsdp_" + key
            assert hasattr(args, name), f"{path.name}: {section}.{key} is not a launch option"
    assert cfg.mixed_precision == "bf16" and cfg.num_processes >= 2


def test_every_accelerate_config_is_listed():
    names = {p.name for p in ACCELERATE}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names
    by_name = {p.name: p.read_text() for p in ACCELERATE}
    assert "zero_stage: 2" in by_name["deepspeed-zero2.yaml"]
    assert "zero_stage: 3" in by_name["deepspeed-zero3.yaml"]


GPU_RECIPES = sorted((ROOT / "recipes").glob("*-gpu-*.yaml"))


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipes_build_and_state_their_hardware(path):
    stage = {"zero": ZeroConfig, "sft": SFTConfig}[path.name.split("-")[0]]
    cfg = cfglib.build(stage, path)
    assert cfg.device == "auto" and cfg.bf16
    head = path.read_text().split("\n\n")[0]
    assert "GPU" in head and "hours" in head  # hardware and expected time, in the header
