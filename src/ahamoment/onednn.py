"""fp32 matrix products on CPU through oneDNN instead of MKL.

torch runs an fp32 ``F.linear`` or ``mm`` on CPU with MKL's sgemm. Both oneDNN and MKL ship
inside torch's CPU wheel, and on some CPUs their fp32 kernels differ a lot for the small
shapes of our models: on an AMD CPU with AVX-512, MKL takes a generic code path and oneDNN
does not (docs/results/performance.md has the rates this machine measured). Both compute in
IEEE fp32 (no reduced-precision mode is asked for); only the order of the sums differs, so
results agree to float rounding, not bit for bit.

Used by the trainer's packed forward and backward (``lora_linear``), by the sampler's prompt
forward (``decoder``) and by the fused decoding step (``rollout/compiled.py``), on fp32 CPU
tensors only; everything else runs as torch would. ``AHAMOMENT_ONEDNN=0`` in the environment
turns it off (``ENABLED``; the benches compare both).

oneDNN builds a kernel per shape, about a millisecond the first time and cached afterwards,
so callers whose row counts vary from call to call round them up to a multiple of ``ROWS``
(``padded_rows``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

ENABLED = os.environ.get("AHAMOMENT_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
"""False: fp32 products on CPU go through torch's own dispatch (MKL)."""

ROWS = 64
"""Row counts of packed streams are rounded up to this multiple (see ``padded_rows``)."""

_op = torch.ops.mkldnn._linear_pointwise


def applies(x: Tensor, weight: Tensor) -> bool:
    """True where oneDNN runs the product: enabled, fp32 CPU tensors, something to compute, and
    no CPU autocast (``--bf16``: torch's own ops then run in bf16; this one would not)."""
    return (
        ENABLED
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of ``ROWS`` where oneDNN is on, else ``n``."""
    return -(-n // ROWS) * ROWS if ENABLED else n


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight (N, K)ᵀ + bias; strided operands are read in place."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out = _op(x2, weight, bias, "none", [], "")
    return out.view(*lead, weight.shape[0]) if x.dim() != 2 else out


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        # x (..., K); weight (N, K); bias (N,) or None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (M, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g, weight.t())  # (..., K): g @ weight, the transpose read strided
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])  # (M, K)
            gw = _mm(g2.t(), x2.t())  # (N, K) = gᵀ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``applies``; differentiable."""
    if not applies(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _Linear.apply(x, weight, bias)
    return _mm(x, weight, bias)
