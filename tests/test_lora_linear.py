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
