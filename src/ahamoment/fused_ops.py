"""The packed forward's RMS norms and SiLU gates as one C kernel each way.

HF's ``LlamaRMSNorm`` is five elementwise ops forward (square, mean, add, rsqrt, two products)
and about twice that backward; ``silu(gate) * up`` is two forward and four backward. On the
trainer's packed stream (~2k rows of width 128 per micro-batch at the embedded model's size) each
op is a pass over memory plus torch's per-op work (docs/results/performance.md has the
profile). Here each is one pass forward (``rms_fwd``,
``silu_fwd``) and one backward (``rms_bwd``, ``silu_bwd``), kernels of the trainer's library
that ``rollout/compiled.py`` builds.

Same formulas as the HF modules, up to float rounding (``tests/test_fused_ops.py`` checks values
and gradients against them in float64). Used only where they apply: fp32 tensors on CPU, CPU
autocast off, the kernels built, and a Llama/Qwen2/Mistral RMSNorm or a SiLU activation; every
other case runs the module itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

ENABLED = True
"""False: the modules run as themselves (``bench/train_step.py --compare fused``)."""

_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # w * x / sqrt(mean(x^2) + eps)


def _lib(*tensors: Tensor):
    """The kernels where they apply to ``tensors``, else None."""
    if not ENABLED or torch.is_autocast_enabled("cpu"):
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    from ahamoment.rollout import compiled

    try:
        return compiled.trainer_kernels()
    except RuntimeError:
        return None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float, lib):
        from ahamoment.rollout.compiled import threads

        x = x.contiguous()
        x2 = x.view(-1, x.shape[-1])  # (S, C)
        y, r = torch.empty_like(x), x.new_empty(x2.shape[0])
        lib.rms_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), r.data_ptr(), *x2.shape, eps,
                    threads(lib))  # fmt: skip
        ctx.save_for_backward(x, w, r)
        ctx.lib = lib
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        from ahamoment.rollout.compiled import threads

        x, w, r = ctx.saved_tensors
        lib, n = ctx.lib, threads(ctx.lib)
        gy = gy.contiguous()
        gx = torch.empty_like(x)
        want_w = ctx.needs_input_grad[1]
        gw = torch.empty_like(w) if want_w else None
        scratch = w.new_empty(n * w.numel()) if want_w else w.new_empty(0)
        S = r.shape[0]
        lib.rms_bwd(
            x.data_ptr(), w.data_ptr(), r.data_ptr(), gy.data_ptr(), gx.data_ptr(),
            gw.data_ptr() if want_w else None, scratch.data_ptr(), S, w.numel(), n,
        )  # fmt: skip
        return gx, gw, None, None


def rms_norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """``norm(x)``, by the kernels where ``norm`` is a Llama/Qwen2/Mistral RMSNorm."""
    if type(norm).__name__ in _NORMS and (lib := _lib(x, norm.weight)) is not None:
        return _RMSNorm.apply(x, norm.weight, float(norm.variance_epsilon), lib)
    return norm(x)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, lib):
        from ahamoment.rollout.compiled import threads

        g, u = g.contiguous(), u.contiguous()
        a = torch.empty_like(g)
        lib.silu_fwd(g.data_ptr(), u.data_ptr(), a.data_ptr(), g.numel(), threads(lib))
        ctx.save_for_backward(g, u)
        ctx.lib = lib
        return a

    @staticmethod
    def backward(ctx, ga: Tensor):
        from ahamoment.rollout.compiled import threads

        g, u = ctx.saved_tensors
        ga = ga.contiguous()
        gg, gu = torch.empty_like(g), torch.empty_like(u)
        ctx.lib.silu_bwd(g.data_ptr(), u.data_ptr(), ga.data_ptr(), gg.data_ptr(),
                         gu.data_ptr(), g.numel(), threads(ctx.lib))  # fmt: skip
        return gg, gu, None


def silu_mul(act: torch.nn.Module, gate: Tensor, up: Tensor) -> Tensor:
    """``act(gate) * up``, by the kernels where ``act`` is SiLU and the shapes agree."""
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    if silu and gate.shape == up.shape and (lib := _lib(gate, up)) is not None:
        return _SiluMul.apply(gate, up, lib)
    return act(gate) * up
