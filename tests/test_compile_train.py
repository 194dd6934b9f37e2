"""``logprobs.compile_layers`` (``--compile-train``): the packed forward with each layer's norms,
projections and MLP under ``torch.compile`` (inductor) gives the eager path's log-probs and
gradients, and one graph serves every stream length."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from ahamoment import fused_ops, logprobs, lora_linear, stream_attention
from ahamoment.logprobs import completion_logprobs
from ahamoment.models import new_model, save_model, tiny_llama_config
from ahamoment.stages.zero import ZeroConfig

ROOT = Path(__file__).resolve().parents[1]


def _batch(vocab: int, seed: int, n_completion: tuple[int, int]):
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(3):
        p = [rng.randrange(7, vocab) for _ in range(rng.randint(4, 9))]
        for _ in range(3):  # groups of 3 rows share a prompt
            prompts.append(p)
            completions.append([rng.randrange(7, vocab) for _ in range(rng.randint(*n_completion))])
    return prompts, completions


def _logp_and_grads(model, prompts, completions):
    model.zero_grad(set_to_none=True)
    logp, mask, _ = completion_logprobs(model, prompts, completions, temperature=0.8)
    weights = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp)
    (logp * mask * weights).sum().backward()
    return logp.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "our-kernels"])
def test_compiled_layers_match_eager_at_every_length_with_one_graph(
    tiny_tokenizer, monkeypatch, kernels
):
    # torch-ops: what runs on a GPU (SDPA over buckets, RoPE in the compiled part); our-kernels:
    # fp32 CPU (the stream attention kernel between the compiled parts applies RoPE itself)
    for mod in (fused_ops, stream_attention, lora_linear):
        monkeypatch.setattr(mod, "ENABLED", kernels)
    cfg = tiny_llama_config(
        tiny_tokenizer, hidden=64, layers=2, heads=4, intermediate=96, max_positions=256
    )
    cfg.num_key_value_heads = 2
    model = new_model(cfg, seed=3).train()
    V = cfg.vocab_size
    batches = [_batch(V, s, n) for s, n in ((0, (2, 8)), (1, (9, 20)), (2, (1, 30)))]
    eager = [_logp_and_grads(model, *b) for b in batches]
    torch._dynamo.reset()  # no graphs from another test
    dynamo_utils.counters.clear()
    assert logprobs.compile_layers(model)
    try:
        graphs = []
        for (p, c), (logp_e, grads_e) in zip(batches, eager):
            logp, grads = _logp_and_grads(model, p, c)
            graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
            # inductor fuses and reorders float sums: agreement to float rounding
            torch.testing.assert_close(logp, logp_e, atol=2e-5, rtol=1e-5)
            for g, g_e in zip(grads, grads_e):
                torch.testing.assert_close(g, g_e, atol=1e-5, rtol=1e-4)
        # the two layer parts compile on the first batch; streams of other lengths reuse them
        assert graphs[0] == 2 and graphs == [2, 2, 2], graphs
    finally:
        logprobs._COMPILED.pop(model, None)


def test_compile_train_is_a_documented_option():
    assert ZeroConfig().compile_train is False  # the recipe's default: our kernels, no compile
    res = subprocess.run(
        [sys.executable, "-m", "ahamoment.cli", "zero", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0 and "--compile-train" in res.stdout


@pytest.mark.slow
def test_zero_with_compile_train_through_the_cli(tiny_model, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    out, cache = tmp_path / "run", tmp_path / "inductor"
    cmd = [sys.executable, "-m", "ahamoment.cli", "zero", "--model", str(base), "--steps", "2",
           "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "12",
           "--heldout-n", "2", "--eval-k", "1", "--eval-every", "0", "--no-real-eval",
           "--threads", "1", "--save-every", "0", "--compile-train", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(cache.rglob("*.py")), "inductor compiled nothing"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # the compiled trainer agrees with the fp32 sampler to float noise, as the eager one does
    assert rows[0]["sampler_mismatch"] < 1e-5
