"""Clipped policy-gradient losses for GRPO-style training.

Every loss shares one per-token objective (the PPO clipped surrogate, as in DeepSeekMath GRPO):

    r_t  = exp(logp_t - old_logp_t)                                    # importance ratio
    pg_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)     # A: the sequence's advantage
    l_t  = pg_t + kl_coef * kl_t                                       # kl_t from ``rl.kl``

and the variants differ only in how the ``(B, T)`` token losses are reduced to a scalar:

- ``"grpo"``: DeepSeekMath/R1 GRPO, ``1/B sum_i 1/|o_i| sum_t l_{i,t}``: a masked token mean
  per sequence, then a mean over sequences. A sequence with no unmasked token contributes 0.
- ``"dr_grpo"``: Dr. GRPO (Liu et al. 2025), ``1/B sum_i 1/L sum_t l_{i,t}`` with the constant
  ``L = cfg.max_len``. Dividing by a constant instead of ``|o_i|`` removes the length bias that
  lets wrong answers grow long (a long wrong answer is penalised less per token under ``1/|o_i|``).
  Pair it with the ``"dr_grpo"`` advantage, which drops the std as well; Dr. GRPO also uses no
  KL term (``kl_coef = 0``).

Deviations from the papers: ``eps_low`` and ``eps_high`` are separate (DAPO's "clip-higher");
set them equal for the published symmetric clip. The KL term is pluggable (``rl.kl``);
published GRPO uses k3. B is the (micro-)batch given to the call: a caller that accumulates
gradients over micro-batches must weight each call by its share of sequences to keep the mean
over the full batch.

``old_logp`` is treated as a constant (detached). Padded positions (``mask == 0``) are filled
with zeros before any arithmetic, so they get exactly zero gradient and may hold any value,
even ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ahamoment.registry import Registry

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, float]]]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


@dataclass
class LossConfig:
    """Settings shared by every policy loss."""

    eps_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - eps_low``."""
    eps_high: float = 0.2
    """Upper clip: the ratio is clipped above at ``1 + eps_high`` (DAPO raises it to 0.28)."""
    kl_coef: float = 0.0
    """Weight of the per-token KL(pi || pi_ref) estimate in the loss (GRPO's beta); 0 disables it."""
    max_len: int = 256
    """Dr. GRPO's constant normaliser: the generation budget in tokens (``max_new_tokens``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0 (it is a penalty), got {self.kl_coef}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 (set it to max_new_tokens), got {self.max_len}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero; 0 (not NaN) where there are none.

    ``dim=None`` reduces everything to a scalar; an int reduces that dimension only.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def _token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-token clipped objective ``(B, T)`` (zero at padding), the bool mask, and the stats."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            "logp, old_logp and mask must all have shape (B, T); got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must have shape (B,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if kl is not None and kl.shape != logp.shape:
        raise ValueError(f"kl must have shape (B, T) like logp, got {tuple(kl.shape)}")

    keep = mask.bool()  # (B, T)
    # Fill padding before exp so garbage there (e.g. -inf) cannot turn into NaN gradients.
    log_ratio = (logp - old_logp.detach()).masked_fill(~keep, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv  # (B, T)
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if kl is not None:
        kl = kl.masked_fill(~keep, 0.0)  # (B, T)
        if cfg.kl_coef != 0.0:
            per_token = per_token + cfg.kl_coef * kl
    per_token = per_token.masked_fill(~keep, 0.0)  # (B, T)

    with torch.no_grad():
        # The clipped branch is the active minimum (and so the gradient is zero) exactly when
        # the ratio has left the clip range in the direction the advantage pushes it.
        clipped_active = ((ratio > 1.0 + cfg.eps_high) & (adv > 0)) | (
            (ratio < 1.0 - cfg.eps_low) & (adv < 0)
        )  # (B, T)
        stats = {
            "clip_frac": masked_mean(clipped_active.to(logp.dtype), keep).item(),
            "ratio_mean": masked_mean(ratio, keep).item(),
            "kl": masked_mean(kl, keep).item() if kl is not None else 0.0,
        }
    return per_token, keep, stats


@POLICY_LOSSES.register("grpo")
def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: masked token mean per sequence, then mean over the B sequences."""
    per_token, keep, stats = _token_losses(logp, old_logp, advantages, mask, cfg, kl)  # (B, T)
    per_seq = masked_mean(per_token, keep, dim=1)  # (B,), 0 for an all-masked sequence
    return per_seq.mean(), stats


@POLICY_LOSSES.register("dr_grpo")
def dr_grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: masked token sum per sequence over the constant ``cfg.max_len``, then mean over B."""
    per_token, _, stats = _token_losses(logp, old_logp, advantages, mask, cfg, kl)  # (B, T)
    per_seq = per_token.sum(dim=1) / cfg.max_len  # (B,); padding is already 0
    return per_seq.mean(), stats
