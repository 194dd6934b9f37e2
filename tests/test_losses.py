"""Policy losses: values, gradients and clipping checked against hand derivations."""

from __future__ import annotations

import math

import pytest
import torch

from ahamoment.rl import KL_ESTIMATORS, POLICY_LOSSES, LossConfig, masked_mean

F64 = torch.float64


def _grad(name: str, logp, old_logp, adv, mask, cfg, kl=None):
    logp = logp.clone().requires_grad_(True)
    loss, stats = POLICY_LOSSES.get(name)(logp, old_logp, adv, mask, cfg, kl)
    loss.backward()
    return loss.item(), logp.grad, stats


def test_registry_names() -> None:
    # a plugin test registers "reinforce" as well, so check the built-ins are all there
    assert {"dapo", "dr_grpo", "grpo", "gspo"} <= set(POLICY_LOSSES.names())


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [5.0, 6.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == 1.5  # (1 + 2) / 2
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 0.0]  # empty row -> 0, not NaN


def test_on_policy_values_and_grads() -> None:
    # ratio = 1 everywhere (old_logp = logp), so pg_t = -A and d pg_t / d logp_t = -A * r = -A.
    # B=2, seq 0 has 3 tokens with A=1, seq 1 has 2 tokens (+1 pad) with A=-2.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)

    # grpo: seq means -1 and +2 -> loss (-1 + 2) / 2 = .5.
    # grad = -A * r / n_i / B: seq 0 -1/3/2 = -1/6; seq 1 2/2/2 = .5; pad 0.
    loss, grad, stats = _grad("grpo", logp, logp, adv, mask, LossConfig())
    assert math.isclose(loss, 0.5, rel_tol=1e-15)
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)
    assert stats == {"clip_frac": 0.0, "ratio_mean": 1.0, "kl": 0.0}

    # dr_grpo, max_len 4: seq sums -3 and +4 -> (-3/4 + 4/4) / 2 = .125.
    # grad = -A * r / max_len / B: seq 0 -1/8; seq 1 2/8 = .25; pad 0.
    loss, grad, _ = _grad("dr_grpo", logp, logp, adv, mask, LossConfig(max_len=4))
    assert math.isclose(loss, 0.125, rel_tol=1e-15)
    expected = torch.tensor([[-1 / 8, -1 / 8, -1 / 8], [0.25, 0.25, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)


def test_clipping_zeroes_gradient_exactly() -> None:
    # eps = .2, so the clip range is [.8, 1.2]. All 6 tokens unmasked, B=2, n=3.
    # seq 0, A=+1, ratios [1.5, .5, 1.1]:
    #   1.5 > 1.2 with A>0: clipped branch 1.2 < 1.5 is the min -> pg = -1.2, grad 0
    #   .5  (low, but A>0): unclipped .5 < .8 is the min -> pg = -.5, grad -A*r/3/2 = -.5/6
    #   1.1 inside:         pg = -1.1, grad -1.1/6
    # seq 1, A=-1, ratios [.5, 1.5, .9]:
    #   .5 < .8 with A<0:   r*A = -.5 vs clip*A = -.8 -> min -.8 clipped -> pg = .8, grad 0
    #   1.5 (high, but A<0): r*A = -1.5 vs -1.2 -> min -1.5 unclipped -> pg 1.5, grad 1.5/6
    #   .9 inside:           pg = .9, grad .9/6
    # loss = ((-1.2 - .5 - 1.1)/3 + (.8 + 1.5 + .9)/3) / 2 = (.4/3) / 2 = 1/15
    # clip_frac = 2/6; ratio_mean = (1.5+.5+1.1+.5+1.5+.9)/6 = 1
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 0.9]], dtype=F64)
    old_logp = torch.tensor([[-1.0, -2.0, -0.7], [-0.4, -3.0, -1.5]], dtype=F64)
    logp = old_logp + ratios.log()
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 3, dtype=F64)

    loss, grad, stats = _grad("grpo", logp, old_logp, adv, mask, LossConfig())
    assert math.isclose(loss, 1 / 15, rel_tol=1e-12)
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() == 0.0  # exactly zero, not small
    expected = torch.tensor([[0.0, -0.5 / 6, -1.1 / 6], [0.0, 1.5 / 6, 0.9 / 6]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert math.isclose(stats["clip_frac"], 1 / 3, rel_tol=1e-12)
    assert math.isclose(stats["ratio_mean"], 1.0, rel_tol=1e-12)


def test_asymmetric_clip_uses_eps_high() -> None:
    # eps_high = .6: ratio 1.5 is now inside [.8, 1.6], so seq 0 token 0 has grad -1.5/3/1.
    old_logp = torch.zeros(1, 3, dtype=F64)
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0]], dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.6)
    _, grad, stats = _grad("grpo", logp, old_logp, torch.ones(1, dtype=F64), torch.ones(1, 3), cfg)
    assert math.isclose(grad[0, 0].item(), -1.5 / 3, rel_tol=1e-12)
    assert stats["clip_frac"] == 0.0


def test_kl_term_and_stat() -> None:
    # A = 0 so only the KL term remains: per token kl_coef * kl.
    # seq 0 kl [1,2,3] mean 2; seq 1 kl [4,5,(pad 100)] mean 4.5 -> loss .1 * (2 + 4.5) / 2 = .325.
    # stat kl = masked token mean = (1+2+3+4+5)/5 = 3 (the pad's 100 is ignored).
    # d loss / d kl = kl_coef / n_i / B: seq 0 .1/3/2, seq 1 .1/2/2, pad 0.
    logp = torch.zeros(2, 3, dtype=F64)
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    cfg = LossConfig(kl_coef=0.1)
    loss, stats = POLICY_LOSSES.get("grpo")(logp, logp, torch.zeros(2, dtype=F64), mask, cfg, kl)
    loss.backward()
    assert math.isclose(loss.item(), 0.325, rel_tol=1e-15)
    assert stats["kl"] == 3.0
    expected = torch.tensor([[0.1 / 6] * 3, [0.1 / 4, 0.1 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(kl.grad, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_all_masked_sequence_and_padding_garbage(name: str) -> None:
    # Seq 1 is fully masked and its logp holds -inf (as a masked log-softmax might); seq 0 has
    # a pad holding NaN. The loss and every gradient must stay finite, pads get exactly 0, and
    # the empty sequence contributes 0 to the mean over B=2.
    logp = torch.tensor([[-1.0, float("nan")], [float("-inf"), float("-inf")]], dtype=F64)
    old_logp = torch.tensor([[-1.0, 0.0], [0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 0], [0, 0]], dtype=F64)
    adv = torch.tensor([1.0, 1.0], dtype=F64)
    cfg = LossConfig(max_len=1)
    loss, grad, stats = _grad(name, logp, old_logp, adv, mask, cfg)
    # one live token with r=1, A=1: pg = -1; over n=1 (grpo) or max_len=1 (dr_grpo); / B=2
    assert loss == -0.5
    assert torch.equal(grad, torch.tensor([[-0.5, 0.0], [0.0, 0.0]], dtype=F64))
    assert all(math.isfinite(v) for v in stats.values())


def test_grpo_padded_batch_equals_unpadded() -> None:
    # The per-sequence mean must not see padding: one sequence padded to T=5 gives the same
    # loss and gradients as the same 3 tokens unpadded.
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(1, 3, generator=g, dtype=F64)
    old = logp + 0.3 * torch.randn(1, 3, generator=g, dtype=F64)
    adv = torch.tensor([0.7], dtype=F64)
    cfg = LossConfig()
    pad = torch.full((1, 2), -5.0, dtype=F64)
    loss_a, grad_a, _ = _grad("grpo", logp, old, adv, torch.ones(1, 3), cfg)
    loss_b, grad_b, _ = _grad(
        "grpo",
        torch.cat([logp, pad], 1),
        torch.cat([old, pad], 1),
        adv,
        torch.tensor([[1.0, 1, 1, 0, 0]]),
        cfg,
    )
    assert loss_a == loss_b
    assert torch.equal(grad_b[:, :3], grad_a) and torch.equal(
        grad_b[:, 3:], torch.zeros(1, 2, dtype=F64)
    )


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_finite_difference(name: str) -> None:
    # Central differences in float64 with eps 1e-6: truncation error ~ eps^2 * f''' ~ 1e-12 and
    # round-off ~ 1e-16 / 1e-6 = 1e-10, so atol 1e-7 / rtol 1e-5 is tight with a margin. The
    # seed keeps every ratio far (> 1e-6) from the clip kinks at .8 and 1.2, where the loss is
    # not differentiable; the draws are checked below.
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    ref = -torch.rand(B, T, generator=g, dtype=F64) * 2
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.05, max_len=6)
    ratios = (logp - old).exp().detach()
    assert ((ratios - 0.8).abs().min() > 1e-3) and ((ratios - 1.2).abs().min() > 1e-3)
    assert ((ratios < 0.8) | (ratios > 1.2)).any()  # some tokens really are clipped

    def f(lp: torch.Tensor) -> torch.Tensor:
        kl = KL_ESTIMATORS.get("k3")(lp, ref)
        return POLICY_LOSSES.get(name)(lp, old, adv, mask, cfg, kl)[0]

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_shape_and_config_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages must have shape \(B,\)"):
        POLICY_LOSSES.get("grpo")(x, x, torch.zeros(3), x, LossConfig())
    with pytest.raises(ValueError, match="shape"):
        POLICY_LOSSES.get("grpo")(x, torch.zeros(2, 4), torch.zeros(2), x, LossConfig())
    with pytest.raises(ValueError, match="eps_low"):
        LossConfig(eps_low=-0.1)
    with pytest.raises(ValueError, match="max_len"):
        LossConfig(max_len=0)
