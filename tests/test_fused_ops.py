"""The packed forward's C kernels (RMS norm, SiLU gate, stream attention) against float64 torch."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from ahamoment import fused_ops, logprobs, stream_attention
from ahamoment.rollout import compiled
from tests_support import gqa_llama, gqa_qwen2

try:
    compiled.trainer_kernels()
except RuntimeError as e:  # no C compiler: the modules run as themselves
    pytest.skip(str(e), allow_module_level=True)


def _grads(fn, inputs, go):
    out = fn(*inputs)
    return (out, *torch.autograd.grad((out * go).sum(), inputs))


def _close(ours, ref, tol=2e-5):
    for a, b in zip(ours, ref):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("shape", [(5, 7, 24), (130, 128)])
def test_rms_norm_is_the_modules(shape):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    go = torch.randn(*shape, dtype=torch.float64)
    ref = _grads(lambda t, w: norm(t), (x, norm.weight), go)
    f32 = LlamaRMSNorm(shape[-1], eps=1e-5)
    f32.weight.data.copy_(norm.weight.data)
    xf = x.detach().float().requires_grad_()
    ours = _grads(lambda t, w: fused_ops.rms_norm(f32, t), (xf, f32.weight), go.float())
    assert ours[0].grad_fn.name().startswith("_RMSNorm")  # the kernel ran, not the module
    _close(ours, ref)


def test_rms_norm_frozen_weight_and_fallbacks():
    norm = LlamaRMSNorm(16).requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    y = fused_ops.rms_norm(norm, x)
    (gx,) = torch.autograd.grad(y.sum(), x)  # no weight gradient asked for
    (ref,) = torch.autograd.grad(norm(x).sum(), x)
    torch.testing.assert_close(gx, ref)
    # float64 and a norm of another formula run the module itself
    assert fused_ops.rms_norm(norm.double(), x.double()).grad_fn.name() == "MulBackward0"
    layer = torch.nn.LayerNorm(16)
    torch.testing.assert_close(fused_ops.rms_norm(layer, x), layer(x))


@pytest.mark.parametrize("width", [384, 37])  # 37: the kernels' scalar tails after 16 lanes
def test_silu_mul_is_the_modules(width):
    torch.manual_seed(0)
    g = (torch.randn(70, width, dtype=torch.float64) * 4).requires_grad_()  # saturates both ways
    u = torch.randn(70, width, dtype=torch.float64, requires_grad=True)
    go = torch.randn(70, width, dtype=torch.float64)
    act = ACT2FN["silu"]
    ref = _grads(lambda a, b: act(a) * b, (g, u), go)
    gf, uf = (t.detach().float().requires_grad_() for t in (g, u))
    ours = _grads(lambda a, b: fused_ops.silu_mul(act, a, b), (gf, uf), go.float())
    assert ours[0].grad_fn.name().startswith("_SiluMul")
    _close(ours, ref)
    gelu = ACT2FN["gelu"]
    torch.testing.assert_close(fused_ops.silu_mul(gelu, gf, uf), gelu(gf) * uf)


@pytest.mark.parametrize(("H", "Hkv", "D", "U"), [(4, 2, 32, 3), (4, 4, 16, 2), (2, 1, 64, 1)])
def test_stream_attention_is_rope_then_the_buckets(H, Hkv, D, U):
    """Values and gradients (queries and stream keys before RoPE, stream values, the prompts'
    keys and values, summed over the rows that share them) against HF's RoPE and SDPA over
    buckets in float64; rows past the stream (padding) give 0."""
    rng, Lp, rows = random.Random(H * D), 11, 7
    torch.manual_seed(D)
    plens = [Lp] + [rng.randrange(3, Lp + 1) for _ in range(U - 1)]  # left-padded prompts
    valid = torch.zeros(U, Lp, dtype=torch.bool)
    for u, n in enumerate(plens):
        valid[u, Lp - n :] = True
    row_u = [rng.randrange(U) for _ in range(rows)]
    seg = [(i, plens[row_u[i]], rng.randrange(1, 20)) for i in range(rows)]
    N = sum(m for *_, m in seg)
    n_out = N + 5
    angle = torch.rand(n_out, D // 2, dtype=torch.float64) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (n_out, D)
    shapes = [(n_out, H, D), (n_out, Hkv, D), (n_out, Hkv, D), (U, Hkv, Lp, D), (U, Hkv, Lp, D)]
    x64 = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    go = torch.randn(n_out, H * D, dtype=torch.float64)
    go[N:] = 0
    buckets = logprobs._RowBuckets(seg, row_u, valid, N, n_out)

    def reference(q, k, *rest):
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=-2)
        return buckets.attend(q, k, *rest, 0.3)[:N]

    ref = _grads(reference, x64, go[:N])
    x32 = [t.detach().float().requires_grad_() for t in x64]
    plan = stream_attention.StreamPlan(
        compiled.kernels(D, "train"), seg, row_u, valid, n_out, cos.float(), sin.float()
    )
    out = plan.attend(*x32, 0.3)
    assert out[N:].abs().max() == 0
    ours = (out[:N], *torch.autograd.grad((out * go.float()).sum(), x32))
    _close(ours, ref)


@pytest.mark.parametrize("make", [gqa_llama, gqa_qwen2])
def test_the_packed_forward_takes_the_kernels(make, monkeypatch):
    """fp32 on CPU, the packed log-probs run the kernels (attention, norms, gates) and give the
    log-probs and gradients the modules and SDPA over buckets give."""
    model = make().train()
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10]]
    comps = [[11, 12, 13, 14, 15], [16, 17], [18, 19, 20]]
    ran = {"attention": 0, "norm": 0, "gate": 0}
    for name, cls in (
        ("attention", stream_attention._Attention),
        ("norm", fused_ops._RMSNorm),
        ("gate", fused_ops._SiluMul),
    ):
        real = cls.apply
        monkeypatch.setattr(
            cls, "apply", lambda *a, _r=real, _n=name: ran.update({_n: ran[_n] + 1}) or _r(*a)
        )
    out = {}
    for on in (True, False):
        monkeypatch.setattr(stream_attention, "ENABLED", on)
        monkeypatch.setattr(fused_ops, "ENABLED", on)
        model.zero_grad()
        lp, mask, _ = logprobs.completion_logprobs(model, prompts, comps, 1.0, 0)
        (lp * mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        out[on] = ((lp * mask).detach(), grads)
        if on:
            assert all(ran.values()), ran
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_stream_attention_steps_aside_where_it_cannot_run(monkeypatch):
    valid = torch.ones(1, 3, dtype=torch.bool)
    seg, cos = [(0, 3, 2)], torch.ones(2, 8)
    assert stream_attention.plan(seg, [0], valid, 2, cos, cos) is not None
    assert stream_attention.plan(seg, [0], valid, 2, cos.double(), cos.double()) is None
    assert stream_attention.plan(seg, [0], valid, 2, torch.ones(2, 7), torch.ones(2, 7)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stream_attention.plan(seg, [0], valid, 2, cos, cos) is None

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(compiled, "kernels", no_compiler)
    assert stream_attention.plan(seg, [0], valid, 2, cos, cos) is None
