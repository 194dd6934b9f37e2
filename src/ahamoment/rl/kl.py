"""Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
"Approximating KL Divergence").

Each estimator maps ``logp``, ``ref_logp`` of shape ``(B, T)`` (log-probabilities of the
sampled tokens under the policy and the frozen reference) to a ``(B, T)`` estimate. With
``d = ref_logp - logp`` (so ``exp(d) = pi_ref / pi``):

- ``"k1"``: ``-d``. Unbiased for the KL, high variance, can be negative.
- ``"k2"``: ``d**2 / 2``. Biased for the KL (low bias when pi is near pi_ref), always >= 0.
- ``"k3"``: ``exp(d) - d - 1``. Unbiased for the KL and always >= 0; this is the estimator in
  DeepSeekMath/R1 GRPO, which adds it to the per-token loss (not to the reward, as PPO-RLHF
  does).

Gradients, when the estimate is added to the loss and differentiated through ``logp`` with the
samples held fixed (what autograd does here): the true gradient is
``E_pi[(log pi - log pi_ref) grad log pi]``.

- k1 gives ``E_pi[grad log pi] = 0``: no expected gradient at all.
- k2 gives ``E_pi[(log pi - log pi_ref) grad log pi]``: exactly the true gradient.
- k3 gives ``E_pi[(1 - pi_ref/pi) grad log pi] = -sum pi_ref grad log pi``, which is the
  gradient of the *reverse* KL(pi_ref || pi), not of KL(pi || pi_ref): so k3 in the loss has a
  biased gradient (an unbiased value does not make an unbiased gradient). The two agree to
  first order near pi = pi_ref, which is why GRPO works with it in practice. We keep k3 as the
  GRPO default for fidelity; k2 is the choice when the gradient should be right.

Placement (``KL_PLACEMENTS``) says where the penalty acts, and is explicit in every run:

- ``"loss"``: ``kl_coef * kl_t`` is added to each token's loss and differentiated, as in
  DeepSeekMath/R1 GRPO and TRL (the gradients above apply).
- ``"reward"``: ``kl_coef * sum_t kl_t`` is subtracted from each completion's reward before
  advantages are computed, as in PPO-RLHF (InstructGPT); it is a detached number, so its
  gradient reaches the policy only through the advantage (a REINFORCE-style estimate). The
  usual estimator here is k1: ``sum_t k1_t`` is the log-ratio of the whole sequence.

A further deviation shared by all three: GRPO samples from pi_old, not pi, so with several
optimiser steps per batch the expectation is off-policy; the papers ignore this, and so do we.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ahamoment.registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``logp - ref_logp``, shape ``(B, T)``."""
    return logp - ref_logp  # (B, T)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``(logp - ref_logp)**2 / 2``, shape ``(B, T)``."""
    return 0.5 * (logp - ref_logp) ** 2  # (B, T)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``exp(ref_logp - logp) - (ref_logp - logp) - 1``, shape ``(B, T)``."""
    d = ref_logp - logp  # (B, T), log(pi_ref / pi)
    return torch.exp(d) - d - 1  # (B, T)


# --- placement -------------------------------------------------------------------------------
PlacementFn = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, float]]
"""``(rewards (B,), kl (B, T), mask (B, T), kl_coef) -> (rewards (B,), loss kl_coef)``."""

KL_PLACEMENTS: Registry[PlacementFn] = Registry("KL placement")


@KL_PLACEMENTS.register("loss")
def kl_in_loss(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, float]:
    """Rewards unchanged; the loss gets ``kl_coef * kl_t`` per token (R1, TRL)."""
    return rewards, kl_coef


@KL_PLACEMENTS.register("reward")
def kl_in_reward(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, float]:
    """``r - kl_coef * sum_t kl_t`` (detached, over unmasked tokens); the loss gets no KL term."""
    per_seq = kl.detach().masked_fill(~mask.bool(), 0.0).sum(dim=1)  # (B,)
    return rewards - kl_coef * per_seq.to(rewards.dtype), 0.0


kl_in_reward.needs_policy_logp = True  # type: ignore[attr-defined]  # before any update
