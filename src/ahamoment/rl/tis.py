"""Truncated importance sampling (TIS) for rollouts from another engine (vLLM).

The sampler's log-probs differ from the trainer's even for the same weights (bf16, other
kernels, other reduction orders), so the rollouts are slightly off-policy. TIS (Yao et al.
2025, "Your efficient RL framework secretly brings you off-policy RL training") weights each
token's policy-gradient term by the truncated ratio

    w_t = min(exp(old_logp_t - sampler_logp_t), C)                     # (B, T), no gradient

where ``old_logp`` is the trainer's log-prob of the token under the policy that sampled it.
The KL term is not weighted. Implemented without touching the losses: ``scale_grad`` gives
the loss the same log-prob *values* (so ratios, clipping and statistics are unchanged) with
gradients multiplied by ``w_t``; for a token-level loss ``w_t * l_t`` and ``l_t`` evaluated at
``scale_grad(logp, w)`` have the same gradient. For GSPO the weight scales each token's share
of the sequence's mean log-ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tis_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``min(exp(old_logp - sampler_logp), cap)`` per token (B, T); 1 at padding; no gradient."""
    if cap <= 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    keep = mask.bool()
    log_w = (old_logp.detach() - sampler_logp.detach()).masked_fill(~keep, 0.0)  # (B, T)
    return torch.exp(log_w).clamp(max=cap)


def scale_grad(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` itself in the forward pass (bit for bit), ``weight * dL/dx`` in the backward."""
    return x.detach() + (x - x.detach()) * weight.detach()
