"""Importance weights for rollouts from another engine (vLLM) or older weights (async RL).

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

Asynchronous RL (``aha zero --max-staleness K``) samples with weights up to K steps old. The
trainer's log-probs before the update (``old_logp``) are then the proximal policy and the
sampler's are the behaviour policy: the same weight corrects both the engine mismatch and the
staleness. ``IMPORTANCE`` holds the two ways to bound it:

- ``truncate``: ``min(w, C)`` (TIS, as above);
- ``mask``: ``w`` where ``w <= C``, else 0 (the token leaves the policy-gradient term): the
  decoupled PPO objective of AReaL (Fu et al. 2025), whose behaviour-weight cap drops tokens
  rather than clipping them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ahamoment.registry import Registry

IMPORTANCE: Registry = Registry("importance weight")
"""``IMPORTANCE.get(name)(old_logp, sampler_logp, mask, cap) -> (B, T)`` weights, no gradient."""


def _ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``exp(old_logp - sampler_logp)`` per token (B, T); 1 at padding; no gradient."""
    if cap <= 0:
        raise ValueError(f"the importance cap must be positive, got {cap}")
    log_w = (old_logp.detach() - sampler_logp.detach()).masked_fill(~mask.bool(), 0.0)
    return torch.exp(log_w)


@IMPORTANCE.register("truncate")
def tis_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``min(exp(old_logp - sampler_logp), cap)`` per token (B, T); 1 at padding; no gradient."""
    return _ratio(old_logp, sampler_logp, mask, cap).clamp(max=cap)


@IMPORTANCE.register("mask")
def masked_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``exp(old_logp - sampler_logp)`` per token (B, T), 0 where it exceeds ``cap``; 1 at
    padding; no gradient (AReaL's decoupled objective)."""
    w = _ratio(old_logp, sampler_logp, mask, cap)  # (B, T)
    return torch.where(w > cap, torch.zeros_like(w), w)


def scale_grad(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` itself in the forward pass (bit for bit), ``weight * dL/dx`` in the backward."""
    return x.detach() + (x - x.detach()) * weight.detach()
