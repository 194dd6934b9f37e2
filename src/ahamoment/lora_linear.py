"""One matrix product per LoRA projection in the trainer's packed forward and backward.

peft's LoRA ``Linear`` computes ``W x + s·B(A x)``: three products and an add forward, and in
the backward two gradient paths into ``x`` that are summed. At the embedded model's size
(C = 128, r = 4, ~10k packed tokens) the thin products and the adds of (N, C) tensors cost as
much as the big product (docs/results/performance.md). Here the forward is one product with the
merged weight ``W + s·B A`` (C_out x C_in, cheap to form), and the backward computes

- grad x = g (W + s·B A): one product;
- grad B = s · gᵀ (x Aᵀ) and grad A = s · (g B)ᵀ x: thin products, as in peft.

The values are peft's up to float rounding (a test checks forward and gradients against peft).
Used only where it applies: a peft LoRA ``Linear`` with one active adapter, no dropout, no
DoRA or other variant, unmerged, and a frozen base weight; every other module runs as itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ahamoment import fused_ops, onednn


class _MergedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, a: Tensor, b: Tensor, scale: float):
        # x (..., C_in); weight (C_out, C_in) frozen; a (r, C_in); b (C_out, r)
        merged = torch.addmm(weight, b, a, alpha=scale)  # (C_out, C_in)
        ctx.save_for_backward(x, a, b, merged)
        ctx.scale = scale
        return onednn.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, a, b, merged = ctx.saved_tensors
        s = ctx.scale
        # (..., C_in): g @ merged, the transpose read in place
        gx = onednn.linear(g, merged.t()) if ctx.needs_input_grad[0] else None
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (N, C_in), (N, C_out)
        ga = gb = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            fused = _one_pass_grads(x2, g2, a, b, s)
            if fused is not None:
                ga, gb = fused
            else:
                ga = (g2 @ b).T @ x2 * s  # (r, C_in)
                gb = g2.T @ (x2 @ a.T) * s  # (C_out, r)
        return gx, None, None, ga, gb, None


FUSED_GRADS = True
"""Adapters' gradients by one pass over x and g (a C kernel, ``rollout/compiled.py``) where it
builds, instead of four thin matrix products that read each twice (the same sums in another
order). False: the products (``bench/train_step.py --compare grads``)."""


def _one_pass_grads(x2: Tensor, g2: Tensor, a: Tensor, b: Tensor, s: float):
    if not FUSED_GRADS:
        return None
    from ahamoment.rollout import compiled  # the trainer's kernels build there

    return compiled.lora_grads(x2, g2, a, b, s)


ENABLED = True
"""False: every projection runs as its own module (``bench/train_step.py`` compares the two)."""


def _plain_lora(mod: torch.nn.Module):
    """(base Linear, A weight, B weight, scale) when ``mod`` is a peft LoRA Linear this module
    can run, else None."""
    lora_a = getattr(mod, "lora_A", None) if ENABLED else None
    if lora_a is None or getattr(mod, "merged", True) or getattr(mod, "disable_adapters", True):
        return None
    active = [n for n in mod.active_adapters if n in lora_a]
    if len(active) != 1 or active[0] in getattr(mod, "lora_variant", {}):
        return None
    name = active[0]
    base = mod.base_layer
    if not isinstance(mod.lora_dropout[name], torch.nn.Identity):
        return None
    if not isinstance(base, torch.nn.Linear) or base.weight.requires_grad:
        return None
    return base, lora_a[name].weight, mod.lora_B[name].weight, float(mod.scaling[name])


def linear(mod: torch.nn.Module, x: Tensor) -> Tensor:
    """``mod(x)``, with a LoRA projection as one merged product (see the module docstring) and
    the products of LoRA and plain ``nn.Linear`` projections through ``onednn``."""
    if type(mod) is torch.nn.Linear:
        return onednn.linear(x, mod.weight, mod.bias)
    plain = _plain_lora(mod)
    if plain is None:
        return mod(x)
    base, a, b, scale = plain
    return _MergedLoraLinear.apply(x, base.weight, base.bias, a, b, scale)


def mlp(block: torch.nn.Module, x: Tensor) -> Tensor:
    """A gated MLP (Llama/Qwen2/Mistral: down(act(gate x) · up x)) through :func:`linear`;
    any other MLP runs as itself."""
    if not all(hasattr(block, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return block(x)
    gate, up = linear(block.gate_proj, x), linear(block.up_proj, x)
    return linear(block.down_proj, fused_ops.silu_mul(block.act_fn, gate, up))
