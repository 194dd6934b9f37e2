"""Options for large models, checked on CPU: gradient checkpointing, bf16, truncated
importance sampling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ahamoment.logprobs import completion_logprobs
from ahamoment.models import save_model
from ahamoment.rl.losses import LossConfig, Norm, grpo_loss
from ahamoment.rl.tis import scale_grad, tis_weights

ROOT = Path(__file__).parent.parent


def test_tis_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    sampler = torch.tensor([[-2.0, -1.0, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = tis_weights(old, sampler, mask, cap=2.0)
    # exp(-1 - -2) = e = 2.718 -> capped at 2; exp(-2 - -1) = 1/e = 0.3679; exp(0) = 1;
    # padding: 1 whatever the values there
    assert w.tolist()[0] == pytest.approx([2.0, math.exp(-1.0), 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        tis_weights(old, sampler, mask, cap=0.0)


def test_scale_grad_keeps_values_and_weights_the_policy_gradient():
    # one sequence of 2 tokens, on-policy (ratio 1), advantage 1, no KL: the GRPO loss is
    # -(r_0 + r_1) / 2 and d/dlogp_t = -1/2 * r_t = -0.5; with weights (2, 0.25) the
    # gradients become (-1.0, -0.125) while the loss value stays -1
    logp = torch.tensor([[-0.7, -1.3]], requires_grad=True)
    w = torch.tensor([[2.0, 0.25]])
    mask = torch.ones(1, 2)
    cfg = LossConfig(0.2, 0.2, 0.0, 8)
    scaled = scale_grad(logp, w)
    assert torch.equal(scaled, logp)  # bit for bit
    loss, _ = grpo_loss(scaled, logp.detach(), torch.tensor([1.0]), mask, cfg, None, Norm(1, 2))
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.0, -0.125])


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients(tiny_model):
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9]]
    comps = [[10, 11], [12], [13, 14, 15]]
    model = tiny_model.train()
    try:
        logp, mask, ent = completion_logprobs(model, prompts, comps, 0.7, 0, True, width=4)
        (-(logp * mask).sum()).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        logp2, mask2, ent2 = completion_logprobs(model, prompts, comps, 0.7, 0, True, width=4)
        (-(logp2 * mask2).sum()).backward()
        assert torch.equal(mask, mask2) and logp2.shape == (3, 4)
        torch.testing.assert_close(logp2, logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent2, ent, rtol=0, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.slow
def test_zero_with_bf16_and_gradient_checkpointing_through_the_cli(
    tiny_model, tiny_tokenizer, tmp_path
):
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    args = ["--model", str(base), "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "12", "--heldout-n", "2", "--eval-k", "1", "--eval-every", "0",
            "--no-real-eval", "--threads", "1", "--save-every", "0",
            "--reward", "reward_plugin:length_penalty", "--tis-cap", "2",
            "--minibatches", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    rows = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16", "--gradient-checkpointing"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "ahamoment.cli", "zero", *args, *extra, "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert (out / "final" / "model.safetensors").exists()
    for r in rows["fp32"] + rows["bf16"]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    # the sampler runs in fp32 in both runs; a bf16 trainer disagrees with it by ~1e-2 per
    # token (bf16 keeps 8 bits of mantissa), an fp32 one by float noise only
    assert rows["fp32"][0]["sampler_mismatch"] < 1e-5
    assert rows["bf16"][0]["sampler_mismatch"] > 1e-4
    # TIS on: the weight is exactly 1 where the sampler agrees, and not where it does not
    assert rows["fp32"][0]["tis_weight"] == pytest.approx(1.0, abs=1e-5)
    assert rows["bf16"][0]["tis_weight"] != pytest.approx(1.0, abs=1e-5)
