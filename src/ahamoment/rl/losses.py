"""Clipped policy-gradient losses for GRPO-style training.

Every token-level loss shares one per-token objective (the PPO clipped surrogate, as in
DeepSeekMath GRPO):

    r_t  = exp(logp_t - old_logp_t)                                    # importance ratio
    pg_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)     # A: the sequence's advantage
    l_t  = pg_t + kl_coef * kl_t                                       # kl_t from ``rl.kl``

and the variants differ in how the ``(B, T)`` token losses are reduced to a scalar:

- ``"grpo"``: DeepSeekMath/R1 GRPO, ``1/N sum_i 1/|o_i| sum_t l_{i,t}``: a masked token mean
  per sequence, then a mean over sequences. A sequence with no unmasked token contributes 0.
- ``"dr_grpo"``: Dr. GRPO (Liu et al. 2025), ``1/N sum_i 1/L sum_t l_{i,t}`` with the constant
  ``L = cfg.max_len``. Dividing by a constant instead of ``|o_i|`` removes the length bias that
  lets wrong answers grow long (a long wrong answer is penalised less per token under ``1/|o_i|``).
  Pair it with the ``"dr_grpo"`` advantage, which drops the std as well; Dr. GRPO also uses no
  KL term (``kl_coef = 0``).
- ``"dapo"``: DAPO (Yu et al. 2025), ``1/sum_i |o_i| sum_i sum_t l_{i,t}``: one token-level mean
  over the whole batch, so every token weighs the same whatever its sequence's length; its
  default clip is "clip-higher", eps_low 0.2 / eps_high 0.28.

and one is sequence-level:

- ``"gspo"``: GSPO (Zheng et al. 2025). The ratio is per sequence,
  ``s_i = exp(1/|o_i| sum_t (logp_t - old_logp_t))`` (the 1/|o_i| keeps it near 1 whatever the
  length), and ``l_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) + kl_coef *
  mean_t kl_t``, averaged over sequences. Its default clip is the paper's 3e-4 / 4e-4.

``N`` and ``sum_i |o_i|`` are the sequence and token counts of the *whole optimizer-step batch*
(:class:`Norm`). A caller that accumulates gradients over micro-batches passes the whole
batch's ``Norm`` to every call, so that 8 micro-batches of 1 give exactly the gradient of one
batch of 8; left out, the call's own batch is the whole batch.

Deviations from the papers: ``eps_low`` and ``eps_high`` are separate for every loss (set them
equal for the published symmetric clip); ``eps_low >= 1`` switches the lower clip off (R1's
stage 1 used eps = 10). The KL term is pluggable (``rl.kl``); published GRPO uses k3.

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

SYMMETRIC_CLIP = (0.2, 0.2)
"""(eps_low, eps_high) of a loss that does not set its own: PPO's and GRPO's 0.2."""


def default_clip(loss_fn: PolicyLossFn) -> tuple[float, float]:
    """A loss's own (eps_low, eps_high): its ``clip`` attribute, else :data:`SYMMETRIC_CLIP`."""
    return getattr(loss_fn, "clip", SYMMETRIC_CLIP)


@dataclass
class LossConfig:
    """Settings shared by every policy loss."""

    eps_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - eps_low`` (>= 1 disables it)."""
    eps_high: float = 0.2
    """Upper clip: the ratio is clipped above at ``1 + eps_high`` (DAPO raises it to 0.28)."""
    kl_coef: float = 0.0
    """Weight of the per-token KL(pi || pi_ref) estimate in the loss (GRPO's beta); 0 disables it."""
    max_len: int = 256
    """Dr. GRPO's constant normaliser: the generation budget in tokens (``max_new_tokens``)."""

    def __post_init__(self) -> None:
        if self.eps_low < 0.0:
            raise ValueError(f"eps_low must be >= 0, got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0 (it is a penalty), got {self.kl_coef}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 (set it to max_new_tokens), got {self.max_len}")


@dataclass(frozen=True)
class Norm:
    """Sequence and token counts of the whole optimizer-step batch (the losses' denominators)."""

    seqs: float
    """Sequences, padded or fully masked ones included (the ``N`` of a mean over sequences)."""
    tokens: float
    """Unmasked completion tokens (the denominator of a token-level mean; at least 1)."""

    @staticmethod
    def of(mask: Tensor) -> Norm:
        """The counts of one ``(B, T)`` mask, for a call that is its own whole batch."""
        return Norm(seqs=float(mask.shape[0]), tokens=max(1.0, float(mask.bool().sum())))


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


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, kl) -> None:
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


def _clipped_surrogate(ratio: Tensor, adv: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """``-min(r A, clip(r) A)`` and where the clipped branch is active (zero gradient), any shape."""
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    with torch.no_grad():
        # The clipped branch is the active minimum (and so the gradient is zero) exactly when
        # the ratio has left the clip range in the direction the advantage pushes it.
        active = ((ratio > 1.0 + cfg.eps_high) & (adv > 0)) | (
            (ratio < 1.0 - cfg.eps_low) & (adv < 0)
        )
    return -torch.minimum(unclipped, clipped), active


def _token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-token clipped objective ``(B, T)`` (zero at padding), the bool mask, and the stats."""
    _check_shapes(logp, old_logp, advantages, mask, kl)
    keep = mask.bool()  # (B, T)
    # Fill padding before exp so garbage there (e.g. -inf) cannot turn into NaN gradients.
    log_ratio = (logp - old_logp.detach()).masked_fill(~keep, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # (B, 1)
    per_token, clipped_active = _clipped_surrogate(ratio, adv, cfg)  # (B, T) each
    if kl is not None:
        kl = kl.masked_fill(~keep, 0.0)  # (B, T)
        if cfg.kl_coef != 0.0:
            per_token = per_token + cfg.kl_coef * kl
    per_token = per_token.masked_fill(~keep, 0.0)  # (B, T)
    with torch.no_grad():
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
    norm: Norm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: masked token mean per sequence, then mean over the batch's ``norm.seqs`` sequences."""
    per_token, keep, stats = _token_losses(logp, old_logp, advantages, mask, cfg, kl)  # (B, T)
    norm = norm or Norm.of(mask)
    per_seq = masked_mean(per_token, keep, dim=1)  # (B,), 0 for an all-masked sequence
    return per_seq.sum() / norm.seqs, stats


@POLICY_LOSSES.register("dr_grpo")
def dr_grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None = None,
    norm: Norm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: masked token sum per sequence over the constant ``cfg.max_len``, mean over seqs."""
    per_token, _, stats = _token_losses(logp, old_logp, advantages, mask, cfg, kl)  # (B, T)
    norm = norm or Norm.of(mask)
    return per_token.sum() / (cfg.max_len * norm.seqs), stats  # padding is already 0


@POLICY_LOSSES.register("dapo")
def dapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None = None,
    norm: Norm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """DAPO: one token-level mean over all ``norm.tokens`` unmasked tokens of the batch."""
    per_token, _, stats = _token_losses(logp, old_logp, advantages, mask, cfg, kl)  # (B, T)
    norm = norm or Norm.of(mask)
    return per_token.sum() / norm.tokens, stats


dapo_loss.clip = (0.2, 0.28)  # type: ignore[attr-defined]  # DAPO's clip-higher


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    kl: Tensor | None = None,
    norm: Norm | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: one clipped ratio per sequence, exp of its mean token log-ratio; mean over seqs."""
    _check_shapes(logp, old_logp, advantages, mask, kl)
    norm = norm or Norm.of(mask)
    keep = mask.bool()  # (B, T)
    live = keep.any(dim=1)  # (B,): a sequence with no token contributes exactly 0
    log_ratio = (logp - old_logp.detach()).masked_fill(~keep, 0.0)  # (B, T)
    seq_ratio = torch.exp(masked_mean(log_ratio, keep, dim=1))  # (B,)
    adv = advantages.detach().to(logp.dtype)  # (B,)
    per_seq, clipped_active = _clipped_surrogate(seq_ratio, adv, cfg)  # (B,) each
    kl_seq = None
    if kl is not None:
        kl_seq = masked_mean(kl.masked_fill(~keep, 0.0), keep, dim=1)  # (B,)
        if cfg.kl_coef != 0.0:
            per_seq = per_seq + cfg.kl_coef * kl_seq
    per_seq = per_seq.masked_fill(~live, 0.0)  # (B,)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped_active.to(logp.dtype), live).item(),
            "ratio_mean": masked_mean(seq_ratio, live).item(),
            "kl": masked_mean(kl, keep).item() if kl is not None else 0.0,
        }
    return per_seq.sum() / norm.seqs, stats


gspo_loss.clip = (3e-4, 4e-4)  # type: ignore[attr-defined]  # the GSPO paper's range
gspo_loss.sequence_level = True  # type: ignore[attr-defined]  # its clip_frac is over sequences

# Without a KL term each built-in loss is the advantage times a function of the ratio, so a row
# whose advantage is exactly 0 adds exactly 0 to the loss and its gradient: `aha zero` skips
# such rows' forward and backward. A plugin loss without this attribute is never skipped.
for _fn in (grpo_loss, dr_grpo_loss, dapo_loss, gspo_loss):
    _fn.advantage_only = True  # type: ignore[attr-defined]
