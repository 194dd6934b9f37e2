"""The merged-product LoRA projection against peft's own LoRA Linear, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from ahamoment import lora_linear

peft = pytest.importorskip("peft")


class _Two(torch.nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, bias=bias)


def _adapted(bias: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(_Two(bias), config).double()
    mod = model.base_model.model.proj
    torch.nn.init.normal_(mod.lora_B["default"].weight, std=0.5)  # B starts at 0
    return mod


@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradients_are_peft_s(bias):
    mod = _adapted(bias)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)  # (batch, tokens, C_in)
    g = torch.randn(2, 7, 5, dtype=torch.float64)
    out = {}
    for name, fn in (("ours", lambda t: lora_linear.linear(mod, t)), ("peft", mod)):
        mod.zero_grad()
        x.grad = None
        y = fn(x)
        (y * g).sum().backward()
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        out[name] = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for ours, ref in zip(out["ours"], out["peft"]):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert mod.base_layer.weight.grad is None  # the frozen weight gets none


def test_gradcheck_over_x_a_and_b():
    mod = _adapted()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w, a, b = mod.base_layer.weight, mod.lora_A["default"].weight, mod.lora_B["default"].weight
    fn = lambda x, a, b: lora_linear._MergedLoraLinear.apply(x, w, None, a, b, 2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_what_it_cannot_run_runs_as_itself(monkeypatch):
    plain = torch.nn.Linear(6, 5)
    assert lora_linear._plain_lora(plain) is None
    assert lora_linear._plain_lora(_adapted(dropout=0.1)) is None  # dropout: peft's own path
    merged = _adapted()
    merged.merge()
    assert lora_linear._plain_lora(merged) is None
    monkeypatch.setattr(lora_linear, "ENABLED", False)
    assert lora_linear._plain_lora(_adapted()) is None


@pytest.mark.parametrize("rows", [1, 7, 300, 1100])
def test_one_pass_adapter_gradients_match_float64(rows):
    """The C kernel's gradients of A and B against the four products in float64."""
    from ahamoment.rollout import compiled

    g = torch.Generator().manual_seed(rows)
    x, gy = torch.randn(rows, 24, generator=g), torch.randn(rows, 40, generator=g)
    a, b = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    out = compiled.lora_grads(x, gy, a, b, 2.5)
    if out is None:
        pytest.skip("no C compiler for the kernels")
    ga, gb = out
    x64, g64, a64, b64 = (t.double() for t in (x, gy, a, b))
    # float32 sums over `rows` terms: agreement to 1e-5 of the largest entry
    for got, ref in ((ga, (g64 @ b64).T @ x64 * 2.5), (gb, g64.T @ (x64 @ a64.T) * 2.5)):
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * scale)
    assert gb.shape == (40, 4) and ga.shape == (4, 24)


def test_adapter_gradients_by_kernel_equal_the_products(monkeypatch):
    """One merged LoRA projection's backward with and without the one-pass kernel."""
    from ahamoment import lora_linear as LL

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, 16, generator=g, requires_grad=True)
    w = torch.randn(24, 16, generator=g)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    b = torch.randn(24, 4, generator=g, requires_grad=True)
    up = torch.randn(2, 50, 24, generator=g)
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(LL, "FUSED_GRADS", fused)
        for t in (x, a, b):
            t.grad = None
        (LL._MergedLoraLinear.apply(x, w, None, a, b, 2.0) * up).sum().backward()
        grads.append([t.grad.clone() for t in (x, a, b)])
    for p, q in zip(*grads):  # float32 sums in another order: to 1e-5 of the largest entry
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5 * q.abs().max().item())
