"""DAPO and GSPO by hand, and properties every policy loss must have: gradient accumulation
with the whole batch's Norm, padding, finite differences on a tiny model, clipping, clip-higher
and R1's eps = 10."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from ahamoment.rl import KL_ESTIMATORS, POLICY_LOSSES, LossConfig, Norm, default_clip
from ahamoment.stages.zero import ZeroConfig

torch.set_num_threads(1)

F64 = torch.float64
NAMES = ["grpo", "dr_grpo", "dapo", "gspo"]
TOKEN_LOSSES = ["grpo", "dr_grpo", "dapo"]


def _grad(name, logp, old_logp, adv, mask, cfg, kl=None, norm=None):
    """Loss value, d loss / d logp and the stats of one call."""
    logp = logp.clone().requires_grad_(True)
    loss, stats = POLICY_LOSSES.get(name)(logp, old_logp, adv, mask, cfg, kl, norm)
    loss.backward()
    return loss.item(), logp.grad, stats


def _own_cfg(name: str, **kw) -> LossConfig:
    """A LossConfig with the loss's own default clip."""
    low, high = default_clip(POLICY_LOSSES.get(name))
    return LossConfig(eps_low=low, eps_high=high, **kw)


def test_default_clip_per_loss() -> None:
    # grpo and dr_grpo set no clip of their own: PPO's symmetric .2. DAPO's clip-higher raises
    # only the upper end to .28; GSPO's sequence ratios live much nearer 1, hence 3e-4 / 4e-4.
    assert default_clip(POLICY_LOSSES.get("grpo")) == (0.2, 0.2)
    assert default_clip(POLICY_LOSSES.get("dr_grpo")) == (0.2, 0.2)
    assert default_clip(POLICY_LOSSES.get("dapo")) == (0.2, 0.28)
    assert default_clip(POLICY_LOSSES.get("gspo")) == (3e-4, 4e-4)


# --- DAPO and GSPO by hand -----------------------------------------------------------------
def _on_policy_batch():
    # B=2: seq 0 has 3 tokens with A=1, seq 1 has 2 tokens and one pad (holding -inf) with A=-2.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, float("-inf")]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    return logp, mask, adv


def test_dapo_on_policy() -> None:
    # ratio 1 everywhere, so pg_t = -A and d pg_t / d logp_t = -A * r = -A.
    # token sum: 3 * (-1) + 2 * (+2) = 1 over 5 unmasked tokens -> loss .2.
    # grad = -A / 5: seq 0 -.2 per token, seq 1 +.4 per token, pad exactly 0.
    logp, mask, adv = _on_policy_batch()
    loss, grad, stats = _grad("dapo", logp, logp, adv, mask, _own_cfg("dapo"))
    assert math.isclose(loss, 0.2, rel_tol=1e-15)
    expected = torch.tensor([[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)
    assert stats == {"clip_frac": 0.0, "ratio_mean": 1.0, "kl": 0.0}


def test_dapo_off_policy() -> None:
    # clip-higher range [.8, 1.28]. 5 unmasked tokens; d(-r A)/d logp = -A r.
    # seq 0, A=+1, ratios [1.25, 1.5, .5]:
    #   1.25 inside             -> pg -1.25, grad -1.25/5 = -.25
    #   1.5 > 1.28 with A>0     -> clipped, pg -1.28, grad 0
    #   .5 (low, but A>0)       -> min(.5, .8) = .5 unclipped, pg -.5, grad -.5/5 = -.1
    # seq 1, A=-.5, ratios [.7, 1.1], pad:
    #   .7 < .8 with A<0        -> r A = -.35 vs .8 A = -.4: min is clipped, pg .4, grad 0
    #   1.1 inside              -> pg .55, grad .5 * 1.1 / 5 = .11
    # loss = (-1.25 - 1.28 - .5 + .4 + .55) / 5 = -2.08 / 5 = -.416; clip_frac 2/5.
    old = torch.tensor([[-1.0, -0.6, -2.0], [-0.4, -1.1, 0.0]], dtype=F64)
    ratios = torch.tensor([[1.25, 1.5, 0.5], [0.7, 1.1, 1.0]], dtype=F64)
    logp = old + ratios.log()
    logp[1, 2] = float("-inf")  # a pad may hold anything
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    loss, grad, stats = _grad("dapo", logp, old, adv, mask, _own_cfg("dapo"))
    # exp(log(r)) reproduces r to a few ulps, hence rel 1e-12 rather than exact
    assert math.isclose(loss, -0.416, rel_tol=1e-12)
    expected = torch.tensor([[-0.25, 0.0, -0.1], [0.0, 0.11, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert grad[0, 1].item() == 0.0 and grad[1, 0].item() == 0.0 and grad[1, 2].item() == 0.0
    assert math.isclose(stats["clip_frac"], 0.4, rel_tol=1e-12)


def test_gspo_on_policy() -> None:
    # s_i = exp(mean log-ratio) = 1, inside even GSPO's narrow default [1 - 3e-4, 1 + 4e-4].
    # l_i = -A_i: loss (-1 + 2) / N=2 = .5.
    # d l_i / d logp_t = -A_i * s_i / |o_i| (s_i = exp(mean), so d s_i / d logp_t = s_i / |o_i|),
    # then / N: seq 0 -1/3/2 = -1/6; seq 1 +2/2/2 = .5; pad 0.
    logp, mask, adv = _on_policy_batch()
    loss, grad, stats = _grad("gspo", logp, logp, adv, mask, _own_cfg("gspo"))
    assert math.isclose(loss, 0.5, rel_tol=1e-15)
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=0)
    assert stats == {"clip_frac": 0.0, "ratio_mean": 1.0, "kl": 0.0}


def test_gspo_off_policy() -> None:
    # eps .2 / .2: the sequence ratio's range is [.8, 1.2]. N = 3.
    # seq 0, A=+1, log-ratios [.1, -.2, .25]: mean .05, s = e^.05 = 1.0513 inside.
    #   l = -e^.05; grad on each of its 3 tokens -A s / 3 / 3 = -e^.05 / 9.
    # seq 1, A=-1, log-ratios [.3, .5] (+ pad): mean .4, s = e^.4 = 1.4918 > 1.2 but A<0:
    #   s A = -1.4918 < 1.2 A = -1.2, so the unclipped branch is the min: l = e^.4,
    #   grad -A s / 2 / 3 = e^.4 / 6 per token.
    # seq 2, A=+2, log-ratios [.4, .2]: mean .3, s = e^.3 = 1.3499 > 1.2 with A>0: clipped,
    #   l = -1.2 * 2 = -2.4 and zero gradient on both tokens (even though neither token's own
    #   ratio matters: only the sequence ratio does).
    # loss = (-e^.05 + e^.4 - 2.4) / 3; clip_frac 1/3; ratio_mean (e^.05 + e^.4 + e^.3) / 3.
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.7, -1.3, 0.0], [-0.2, -0.9, 0.0]], dtype=F64)
    log_ratio = torch.tensor([[0.1, -0.2, 0.25], [0.3, 0.5, 0.0], [0.4, 0.2, 0.0]], dtype=F64)
    logp = old + log_ratio
    logp[1:, 2] = float("-inf")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.2)
    loss, grad, stats = _grad("gspo", logp, old, adv, mask, cfg)
    e05, e4, e3 = math.exp(0.05), math.exp(0.4), math.exp(0.3)
    # (old + x) - old reproduces x only to an ulp of old, hence rel 1e-12
    assert math.isclose(loss, (-e05 + e4 - 2.4) / 3, rel_tol=1e-12)
    expected = torch.tensor([[-e05 / 9] * 3, [e4 / 6, e4 / 6, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    assert torch.equal(grad[2], torch.zeros(3, dtype=F64)) and grad[1, 2].item() == 0.0
    assert math.isclose(stats["clip_frac"], 1 / 3, rel_tol=1e-12)
    assert math.isclose(stats["ratio_mean"], (e05 + e4 + e3) / 3, rel_tol=1e-12)


# --- gradient accumulation -----------------------------------------------------------------
LENGTHS = [6, 1, 3, 5, 2, 4, 6, 0]  # 27 tokens; the last sequence is empty (fully masked)


def _accumulation_batch():
    """8 sequences, T=6: varied lengths, finite garbage at pads, off-policy ratios, a reference."""
    g = torch.Generator().manual_seed(3)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(B, T, dtype=F64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1.0
    logp = -2 * torch.rand(B, T, generator=g, dtype=F64)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    pad = mask == 0
    logp, old, ref = (
        logp.masked_fill(pad, 7.0),
        old.masked_fill(pad, -3.0),
        ref.masked_fill(pad, 5.0),
    )
    return logp, old, ref, adv, mask


ACCUMULATION_CASES = [
    ("grpo", _own_cfg("grpo", kl_coef=0.1, max_len=6)),
    ("dr_grpo", _own_cfg("dr_grpo", kl_coef=0.1, max_len=6)),
    ("dapo", _own_cfg("dapo", kl_coef=0.1, max_len=6)),
    ("gspo", _own_cfg("gspo", kl_coef=0.1, max_len=6)),
    ("gspo", LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.1, max_len=6)),
]


def _micro(name, cfg, logp_leaf, old, ref, adv, mask, norm_of):
    """Sum of 8 one-sequence calls (k3 KL in the loss), gradients accumulated into the leaf."""
    fn = POLICY_LOSSES.get(name)
    total = 0.0
    for i in range(mask.shape[0]):
        s = slice(i, i + 1)
        lp = logp_leaf[s]
        kl = KL_ESTIMATORS.get("k3")(lp, ref[s])
        loss, _ = fn(lp, old[s], adv[s], mask[s], cfg, kl, norm_of(mask[s]))
        loss.backward()
        total += loss.item()
    return total


@pytest.mark.parametrize(("name", "cfg"), ACCUMULATION_CASES)
def test_gradient_accumulation_matches_one_batch(name: str, cfg: LossConfig) -> None:
    logp, old, ref, adv, mask = _accumulation_batch()
    ratios = (logp - old).exp()[mask.bool()]
    assert (ratios < 0.8).any() and (ratios > 1.28).any()  # really off-policy, some clipped

    whole = logp.clone().requires_grad_(True)
    kl = KL_ESTIMATORS.get("k3")(whole, ref)
    loss, _ = POLICY_LOSSES.get(name)(whole, old, adv, mask, cfg, kl)
    loss.backward()

    norm = Norm.of(mask)
    assert norm == Norm(seqs=8.0, tokens=27.0)
    micro = logp.clone().requires_grad_(True)
    total = _micro(name, cfg, micro, old, ref, adv, mask, lambda m: norm)

    # Each token's gradient is the same chain of elementwise float64 operations either way
    # (the backward of a sum is a broadcast, so no summation order enters it); only the loss
    # values are summed in a different order. A few ulps (~1e-16 relative) would be the most
    # to expect (measured: the gradients agree bitwise); 1e-13 is tight yet leaves a margin.
    assert whole.grad.abs().max() > 1e-3  # not vacuous
    torch.testing.assert_close(micro.grad, whole.grad, rtol=1e-13, atol=1e-16)
    assert math.isclose(total, loss.item(), rel_tol=1e-13, abs_tol=1e-16)
    assert torch.equal(whole.grad[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=F64))


def test_dapo_micro_batches_need_the_whole_batch_norm() -> None:
    # Each call normalising by its own |o_i| instead of the batch's 27 tokens scales sequence
    # i's gradient by 27 / |o_i|: a different (and length-biased) gradient. The empty sequence
    # has no gradient either way (Norm.of gives it tokens = max(1, 0) = 1, but every term is 0).
    name, cfg = "dapo", _own_cfg("dapo", kl_coef=0.1, max_len=6)
    logp, old, ref, adv, mask = _accumulation_batch()
    batch = logp.clone().requires_grad_(True)
    _micro(name, cfg, batch, old, ref, adv, mask, lambda m: Norm.of(mask))
    own = logp.clone().requires_grad_(True)
    _micro(name, cfg, own, old, ref, adv, mask, lambda m: None)  # None: Norm.of(its own mask)
    assert not torch.allclose(own.grad, batch.grad, rtol=1e-3, atol=0)
    scale = torch.tensor([27.0 / max(n, 1) for n in LENGTHS], dtype=F64)[:, None]
    # the two differ by one multiplication by a count, so a few ulps: 1e-13 relative
    torch.testing.assert_close(own.grad, batch.grad * scale, rtol=1e-13, atol=1e-16)


# --- padding -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_unpadded_sequences(name: str) -> None:
    # Three sequences of 3, 2 and 1 tokens padded to T=5, with -inf in logp, NaN in old_logp
    # and inf in the KL at the pads, against each sequence alone without any padding (passed the
    # batch's Norm: 3 sequences, 6 tokens). Same loss, same gradients, pads exactly 0.
    g = torch.Generator().manual_seed(5)
    lens = [3, 2, 1]
    seqs = [-torch.rand(n, generator=g, dtype=F64) - 0.1 for n in lens]
    olds = [s + 0.1 * torch.randn(len(s), generator=g, dtype=F64) for s in seqs]
    kls = [torch.rand(len(s), generator=g, dtype=F64) for s in seqs]
    adv = torch.tensor([0.7, -1.1, 0.4], dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.05, max_len=5)
    T = 5

    def padded(rows, fill):
        return torch.stack(
            [torch.cat([r, torch.full((T - len(r),), fill, dtype=F64)]) for r in rows]
        )

    mask = padded([torch.ones(n, dtype=F64) for n in lens], 0.0)
    logp_pad = padded(seqs, float("-inf"))
    old_pad = padded(olds, float("nan"))
    kl_pad = padded(kls, float("inf"))
    loss_pad, grad_pad, _ = _grad(name, logp_pad, old_pad, adv, mask, cfg, kl_pad)

    norm = Norm(seqs=3.0, tokens=6.0)
    loss_sum = 0.0
    for i, n in enumerate(lens):
        one = slice(i, i + 1)
        loss_i, grad_i, _ = _grad(
            name, seqs[i][None], olds[i][None], adv[one], torch.ones(1, n), cfg, kls[i][None], norm
        )
        loss_sum += loss_i
        # the same elementwise chain per token, so a few ulps at most
        torch.testing.assert_close(grad_pad[i, :n], grad_i[0], rtol=1e-14, atol=0)
        assert torch.equal(grad_pad[i, n:], torch.zeros(T - n, dtype=F64))  # exactly 0, no NaN
    assert math.isfinite(loss_pad)
    assert math.isclose(loss_pad, loss_sum, rel_tol=1e-14)


# --- finite differences on a tiny model ----------------------------------------------------
PROMPT = 3
# completion tokens of 4 rows (0 is the pad id) and their advantages
COMPLETIONS = [[5, 9, 2, 14, 7], [3, 11, 5], [8, 5, 17, 1], [12, 4]]
ADV = [1.0, -0.7, 0.5, -1.2]
# fixed log-ratios log(pi / pi_old) at the starting weights (old_logp = logp - LOG_RATIO):
# token ratios spread over both sides of every clip range (checked in the test); row means
# -.03, -.2, .2, .3 put GSPO's sequence ratios at .97 (A>0: live), .82 (A<0: inside .8 / 1.2,
# clipped under the default 3e-4), 1.22 (A>0: clipped) and 1.35 (A<0: live).
LOG_RATIO = [
    [0.3, -0.1, -0.25, 0.05, -0.15],
    [-0.4, 0.1, -0.3, 0.0, 0.0],
    [0.35, 0.2, -0.05, 0.3, 0.0],
    [0.5, 0.1, 0.0, 0.0, 0.0],
]
PARAMS = [
    ("model.embed_tokens.weight", (5, 3)),
    ("model.layers.0.self_attn.q_proj.weight", (1, 2)),
    ("model.layers.0.self_attn.v_proj.weight", (6, 0)),
    ("model.layers.0.mlp.down_proj.weight", (4, 7)),
    ("model.norm.weight", (2,)),
    ("lm_head.weight", (5, 1)),
]


def _rms_norm_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its cast to float32 (same formula, in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_llama(monkeypatch):
    # Hugging Face's LlamaRMSNorm computes in float32 whatever the model's dtype, so a float64
    # Llama is only float32-accurate in its weights' gradients: central differences with a
    # 1e-6 step then see ~1e-7 / 1e-6 = O(.1) noise. Keep the norm in float64 for this test.
    # (The rotary cos/sin are also computed in float32, but they do not depend on the weights.)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_float64)
    return _tiny_llama()


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.5,  # far from uniform logits, so the gradients are not tiny
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(F64).eval()


def _model_logp(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probs of the completion tokens; right padding cannot affect earlier tokens."""
    logits = model(input_ids=ids).logits[:, PROMPT - 1 : -1]  # (B, T, V), float64
    return torch.log_softmax(logits, -1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)


FD_CASES = [
    ("grpo", LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.05, max_len=6)),
    ("dr_grpo", LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.05, max_len=6)),
    ("dapo", _own_cfg("dapo", kl_coef=0.05)),
    ("gspo", _own_cfg("gspo", kl_coef=0.05)),
    ("gspo", LossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.05)),
]


@pytest.mark.parametrize(("name", "cfg"), FD_CASES)
def test_gradient_matches_finite_differences_on_tiny_model(
    name: str, cfg: LossConfig, float64_llama
) -> None:
    model = float64_llama
    T = max(map(len, COMPLETIONS))
    prompt = [1, 6, 10]
    ids = torch.tensor([prompt + c + [0] * (T - len(c)) for c in COMPLETIONS])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in COMPLETIONS], dtype=F64)
    adv = torch.tensor(ADV, dtype=F64)
    delta = torch.tensor(LOG_RATIO, dtype=F64) * mask
    with torch.no_grad():
        logp0 = _model_logp(model, ids)
    old = logp0 - delta  # ratio exp(delta) at the current weights
    ref = logp0 + 0.2 * torch.cos(torch.arange(mask.numel(), dtype=F64)).view_as(mask)
    keep = mask.bool()

    # Kinks of the loss (where it is not differentiable) are at ratio 1 - eps_low, 1 + eps_high.
    # A parameter step of 1e-6 moves a log-ratio by ~1e-6 here, so staying 1e-3 away suffices.
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    if name == "gspo":
        r = delta.sum(1).div(mask.sum(1)).exp()  # sequence ratios
        a = adv
    else:
        r, a = delta.exp()[keep], adv[:, None].expand_as(mask)[keep]
    assert (r - lo).abs().min() > 1e-3 and (r - hi).abs().min() > 1e-3
    clipped = ((r > hi) & (a > 0)) | ((r < lo) & (a < 0))
    assert clipped.any() and (~clipped).any()  # both branches of the min are exercised

    fn, kl_fn = POLICY_LOSSES.get(name), KL_ESTIMATORS.get("k3")

    def loss() -> torch.Tensor:
        lp = _model_logp(model, ids)
        return fn(lp, old, adv, mask, cfg, kl_fn(lp, ref))[0]

    named = dict(model.named_parameters())
    model.zero_grad()
    loss().backward()
    auto = torch.tensor([named[p].grad[i].item() for p, i in PARAMS], dtype=F64)

    eps = 1e-6
    numeric = []
    with torch.no_grad():
        for p, i in PARAMS:
            w = named[p]
            w0 = w[i].item()
            w[i] = w0 + eps
            up = loss().item()
            w[i] = w0 - eps
            down = loss().item()
            w[i] = w0
            numeric.append((up - down) / (2 * eps))
    numeric = torch.tensor(numeric, dtype=F64)
    # Central differences: truncation ~ eps^2 |f'''| ~ 1e-12, round-off ~ 1e-16 |f| / eps ~ 1e-10;
    # atol 1e-8 + rtol 1e-6 is tight against gradients of size ~1e-2 while leaving a margin.
    assert auto.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(auto, numeric, rtol=1e-6, atol=1e-8)


# --- clipping ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKEN_LOSSES)
def test_clipped_tokens_get_exactly_zero_gradient(name: str) -> None:
    # range [.8, 1.2]. A>0 row: ratios 1.3 (clipped), 1.25 (clipped), .5 (low but A>0: live),
    # 1.1 (inside). A<0 row: .5 (clipped), .7 (clipped), 1.5 (high but A<0: live), .9 (inside).
    ratios = torch.tensor([[1.3, 1.25, 0.5, 1.1], [0.5, 0.7, 1.5, 0.9]], dtype=F64)
    old = torch.tensor([[-1.0, -0.2, -2.0, -0.7], [-0.4, -3.0, -1.5, -0.1]], dtype=F64)
    logp = old + ratios.log()
    adv = torch.tensor([0.6, -1.5], dtype=F64)
    mask = torch.ones(2, 4, dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, max_len=4)
    _, grad, stats = _grad(name, logp, old, adv, mask, cfg)
    clipped = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(grad[clipped], torch.zeros(4, dtype=F64))  # exactly, not just small
    # live tokens: -A r / (|o_i| N) for grpo, / (max_len N) for dr_grpo, / tokens for dapo,
    # all of which are / 8 here (|o_i| = max_len = 4, N = 2, tokens = 8)
    expected = -adv[:, None] * ratios / 8
    torch.testing.assert_close(grad[~clipped], expected[~clipped], rtol=1e-12, atol=0)
    assert stats["clip_frac"] == 0.5


def test_gspo_clipped_sequence_gets_zero_gradient_on_every_token() -> None:
    # range [.8, 1.2]. Token log-ratios per row (4 tokens each, N=4):
    # row 0, A=+1, [.5, .3, -.1, .1]: mean .2, s = e^.2 = 1.2214 > 1.2 with A>0 -> clipped:
    #   every token 0, although tokens 2 and 3 alone (ratios .90, 1.11) would be inside.
    # row 1, A=-1, [-.5, -.3, -.2, -.2]: mean -.3, s = e^-.3 = .7408 < .8 with A<0 -> clipped,
    #   every token 0.
    # row 2, A=+1, [-.5, -.3, -.2, -.2]: s = .7408 low but A>0 -> live: -A s / 4 / 4 per token.
    # row 3, A=-1, [.5, .3, -.1, .1]: s = 1.2214 high but A<0 -> live: +s / 16 per token.
    up = [0.5, 0.3, -0.1, 0.1]
    down = [-0.5, -0.3, -0.2, -0.2]
    log_ratio = torch.tensor([up, down, down, up], dtype=F64)
    old = -torch.linspace(0.1, 1.6, 16, dtype=F64).view(4, 4)
    logp = old + log_ratio
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    cfg = LossConfig(eps_low=0.2, eps_high=0.2)
    _, grad, stats = _grad("gspo", logp, old, adv, torch.ones(4, 4), cfg)
    assert torch.equal(grad[:2], torch.zeros(2, 4, dtype=F64))
    s_up, s_down = math.exp(0.2), math.exp(-0.3)
    torch.testing.assert_close(
        grad[2], torch.full((4,), -s_down / 16, dtype=F64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(grad[3], torch.full((4,), s_up / 16, dtype=F64), rtol=1e-12, atol=0)
    assert stats["clip_frac"] == 0.5


@pytest.mark.parametrize("name", TOKEN_LOSSES)
def test_clip_higher_changes_only_tokens_above_1_plus_eps_low(name: str) -> None:
    # eps_high .2 vs .28 on the same batch. For A>0 the upper clip acts at 1.2 vs 1.28: a token
    # at 1.25 is clipped (grad 0) under .2 and live (-A r / 16) under .28; a token at 1.35 is
    # clipped under both (grad 0 = 0). For A<0 the upper clip never binds. Every other token's
    # gradient is computed identically, so it is bitwise equal.
    ratios = torch.tensor(
        [
            [0.5, 0.85, 1.0, 1.1, 1.19, 1.21, 1.25, 1.35],
            [0.5, 0.85, 1.0, 1.1, 1.19, 1.21, 1.25, 1.35],
        ],
        dtype=F64,
    )
    old = -torch.linspace(0.2, 3.0, 16, dtype=F64).view(2, 8)
    logp = old + ratios.log()
    adv = torch.tensor([0.8, -0.8], dtype=F64)
    mask = torch.ones(2, 8, dtype=F64)
    _, g_sym, _ = _grad(
        name, logp, old, adv, mask, LossConfig(eps_low=0.2, eps_high=0.2, max_len=8)
    )
    _, g_high, _ = _grad(
        name, logp, old, adv, mask, LossConfig(eps_low=0.2, eps_high=0.28, max_len=8)
    )
    above = torch.zeros(2, 8, dtype=torch.bool)
    above[0, 5:] = True  # ratio > 1.2 with A>0
    assert torch.equal(g_sym[~above], g_high[~above])
    # in (1.2, 1.28]: 0 vs -A r / 16 (|o_i| = max_len = 8, N = 2; dapo: 16 tokens)
    assert g_sym[0, 5].item() == 0.0 and g_sym[0, 6].item() == 0.0
    assert math.isclose(g_high[0, 6].item(), -0.8 * 1.25 / 16, rel_tol=1e-12)
    assert math.isclose(g_high[0, 5].item(), -0.8 * 1.21 / 16, rel_tol=1e-12)
    assert g_sym[0, 7].item() == 0.0 and g_high[0, 7].item() == 0.0  # above 1.28: clipped in both


def test_gspo_clip_higher_changes_only_sequences_above_1_plus_eps_low() -> None:
    # Sequence ratios 1.1, 1.25, 1.35 with A>0 and 1.25 with A<0 (2 tokens each, N=4): only the
    # A>0 sequence at 1.25 changes (clipped under .2, live under .28 with -A s / 2 / 4 per token).
    s = torch.tensor([1.1, 1.25, 1.35, 1.25], dtype=F64)
    log_ratio = s.log()[:, None].expand(4, 2) + torch.tensor([[0.1, -0.1]], dtype=F64)
    old = -torch.linspace(0.2, 1.6, 8, dtype=F64).view(4, 2)
    logp = old + log_ratio
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64)
    mask = torch.ones(4, 2, dtype=F64)
    _, g_sym, _ = _grad("gspo", logp, old, adv, mask, LossConfig(eps_low=0.2, eps_high=0.2))
    _, g_high, _ = _grad("gspo", logp, old, adv, mask, LossConfig(eps_low=0.2, eps_high=0.28))
    for i in (0, 2, 3):
        assert torch.equal(g_sym[i], g_high[i])
    assert torch.equal(g_sym[1], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(
        g_high[1], torch.full((2,), -1.25 / 8, dtype=F64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_r1_eps_10_switches_the_lower_clip_off(name: str) -> None:
    # R1 stage 1: eps = 10, so the range [-9, 11] never clips a ratio of .05 with A = -1.
    # One token, B = 1, max_len 1: every loss reduces to -A r = .05 with gradient -A r = .05
    # (for gspo, s = r on a one-token sequence). Under the default .2 it is clipped: grad 0.
    cfg = LossConfig(eps_low=10.0, eps_high=10.0, max_len=1)
    old = torch.tensor([[-1.0]], dtype=F64)
    logp = old + math.log(0.05)
    adv = torch.tensor([-1.0], dtype=F64)
    mask = torch.ones(1, 1, dtype=F64)
    loss, grad, stats = _grad(name, logp, old, adv, mask, cfg)
    assert math.isclose(loss, 0.05, rel_tol=1e-12)
    assert math.isclose(grad.item(), 0.05, rel_tol=1e-12)
    assert stats["clip_frac"] == 0.0
    _, grad_default, _ = _grad(name, logp, old, adv, mask, _own_cfg(name, max_len=1))
    assert grad_default.item() == 0.0


def test_readme_plugin_loss_runs_and_matches_the_readme() -> None:
    # The README's "Adding a variant" example is this file, verbatim, and it works by import path.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    plugin = (Path(__file__).parent / "loss_plugin.py").read_text()
    assert f"```python\n{plugin}```" in readme
    fn = POLICY_LOSSES.get("loss_plugin:reinforce_loss")
    assert POLICY_LOSSES.get("reinforce") is fn  # importing it registered the short name
    # logp (-1, -2), A = 2: token losses 2 and 4, mean 3, one sequence -> 3; d/d logp = -A/2 = -1
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    loss, stats = fn(
        logp, logp.detach(), torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2), None
    )
    loss.backward()
    assert loss.item() == 3.0 and logp.grad.tolist() == [[-1.0, -1.0]]
    ZeroConfig(loss="loss_plugin:reinforce_loss")  # a run accepts it
