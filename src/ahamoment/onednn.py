"""fp32 matrix products on CPU through oneDNN instead of MKL.

torch runs an fp32 ``F.linear`` or ``mm`` on CPU with MKL's sgemm. Both oneDNN and MKL ship
inside torch's CPU wheel, and on some CPUs their fp32 kernels differ a lot for the small
shapes of our models: MKL picks its code path by CPU vendor, and on an AMD CPU with AVX-512 it
takes a generic one where oneDNN does not. On an Intel CPU MKL's own path is the faster of the
two, so oneDNN is on by default only on x86-64 CPUs that are not Intel's
(docs/results/performance.md has the rates both machines measured). Both compute in IEEE fp32
(no reduced-precision mode is asked for); only the order of the sums differs, so results agree
to float rounding, not bit for bit.

Used by the trainer's packed forward and backward (``lora_linear``), by the sampler's prompt
forward (``decoder``) and by the fused decoding step (``rollout/compiled.py``), on fp32 CPU
tensors only; everything else runs as torch would. ``AHAMOMENT_ONEDNN=1`` in the environment
turns it on whatever the CPU, ``AHAMOMENT_ONEDNN=0`` off (``ENABLED``; the benches compare
both).

oneDNN builds a kernel per shape, about a millisecond the first time, and keeps it with a
work buffer that grows with the rows (several MB for a few thousand rows) in a cache of up to
1024 shapes. So the row counts a run sees must be few: products run over at most ``BLOCK``
rows at a time (longer inputs in blocks, the last one as long as what is left), and callers
whose row counts vary round them up to a multiple of ``ROWS`` (``padded_rows``).
"""

from __future__ import annotations

import os
import platform

import torch
from torch import Tensor

AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
)
"""oneDNN's products can run here: an x86-64 CPU and a torch built with it. Elsewhere torch's
own BLAS is the one tuned for the CPU."""


def cpu_vendor() -> str:
    """The CPU vendor's id ("GenuineIntel", "AuthenticAMD", ...), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    # Windows names the vendor at the end of platform.processor(); elsewhere this is "" or a
    # family name, which counts as not Intel's
    return platform.processor().rsplit(",", 1)[-1].strip()


def on_by_default(env: str | None, vendor: str) -> bool:
    """The default of ``ENABLED`` where oneDNN is available: ``AHAMOMENT_ONEDNN`` ("0" or "1")
    when set, else on except on Intel CPUs (where MKL runs its tuned path)."""
    env = (env or "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"AHAMOMENT_ONEDNN must be 0 (off) or 1 (on), got {env!r}")
    return env == "1" if env else vendor != "GenuineIntel"


ENABLED = AVAILABLE and on_by_default(os.environ.get("AHAMOMENT_ONEDNN"), cpu_vendor())
"""False: fp32 products on CPU go through torch's own dispatch (MKL). See ``on_by_default``."""

ROWS = 64
"""Row counts of packed streams are rounded up to this multiple (see ``padded_rows``)."""

BLOCK = 1024
"""Rows per product: longer inputs run in blocks of this many (one kernel shape for all)."""

MIN_ROWS = 32
"""Fewer rows run as torch's own product: oneDNN's fixed cost per call (a few microseconds)
outweighs its faster arithmetic below about this many (the decoding step's last rows)."""


def applies(x: Tensor, weight: Tensor) -> bool:
    """True where oneDNN runs the product: enabled, fp32 CPU tensors, at least MIN_ROWS rows,
    and no CPU autocast (``--bf16``: torch's own ops then run in bf16; this one would not)."""
    return (
        ENABLED
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1] > 0
        and not torch.is_autocast_enabled("cpu")
    )


def padded_rows(n: int, multiple: int = ROWS) -> int:
    """``n`` rounded up to a multiple of ``multiple`` where oneDNN is on, else ``n``."""
    return -(-n // multiple) * multiple if ENABLED else n


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight (N, K)ᵀ + bias by oneDNN, no checks: M <= BLOCK, and ``applies``
    holds; strided operands are read in place. Not differentiable."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight (N, K)ᵀ + bias, in blocks of at most BLOCK rows."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    M = x2.shape[0]
    if M <= BLOCK:
        out = product(x2, weight, bias)
    else:
        out = torch.cat([product(x2[s : s + BLOCK], weight, bias) for s in range(0, M, BLOCK)])
    return out.view(*x.shape[:-1], weight.shape[0])


def _mm_t(g: Tensor, x: Tensor) -> Tensor:
    """gᵀ x (N, K) for g (M, N) and x (M, K): the sum over M taken in blocks of BLOCK rows."""
    out = None
    for s in range(0, g.shape[0], BLOCK):
        part = product(g[s : s + BLOCK].t(), x[s : s + BLOCK].t(), None)
        out = part if out is None else out.add_(part)
    return out


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
            gw = _mm_t(g2, x2)  # (N, K) = gᵀ x
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
