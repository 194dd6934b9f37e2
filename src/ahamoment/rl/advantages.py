"""Group-relative advantage estimators: one scalar per completion, from its group's rewards.

Every estimator takes ``rewards`` of shape ``(N,)`` with ``N = P * G``: P prompts, each with
G sampled completions stored in consecutive rows (rows ``[p*G, (p+1)*G)`` are prompt p's
group). The result has the same shape and is broadcast over a completion's tokens by the
policy loss (outcome supervision: every token of a completion shares its advantage).

Variants and how they relate to the published methods:

- ``"grpo"``: DeepSeekMath (Shao et al. 2024) / DeepSeek-R1 GRPO,
  ``A_i = (r_i - mean(r)) / std(r)``. The papers do not say which std; we use the sample std
  (Bessel's correction, as ``torch.std`` does by default) plus ``1e-4`` in the denominator so a
  group with tiny spread cannot blow up. Deviation: a group whose rewards are all equal gets
  advantage exactly 0 (we zero it explicitly instead of trusting ``0 / 1e-4`` to round to 0).
- ``"dr_grpo"``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"),
  ``A_i = r_i - mean(r)``. Dropping the std removes the question-difficulty bias that
  up-weights groups with nearly constant rewards (very easy or very hard prompts).
- ``"rloo"``: the REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024),
  ``A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(r))``. Deviation: published RLOO is
  plain REINFORCE on whole sequences; here it is only the baseline, combined with whichever
  (clipped, per-token) policy loss the run selects.

Groups with all-equal rewards carry no learning signal under any of the three (every
advantage is 0); :func:`count_constant_groups` counts them so a run can log the fraction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ahamoment.registry import Registry

AdvantageFn = Callable[[Tensor, int], Tensor]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")

GRPO_STD_EPS = 1e-4
"""Added to the group std in ``"grpo"`` (the denominator), so a near-constant group stays finite."""


def _groups(rewards: Tensor, group_size: int, min_size: int = 1) -> Tensor:
    """Reshape ``(N,)`` rewards to ``(P, G)``, checking the shapes first."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size} for this estimator, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            "sample the same number of completions for every prompt"
        )
    return rewards.view(-1, group_size)  # (P, G)


def _is_constant(groups: Tensor) -> Tensor:
    """``(P, G) -> (P, 1)`` bool: True where every reward in the group equals the first."""
    return (groups == groups[:, :1]).all(dim=1, keepdim=True)


def count_constant_groups(rewards: Tensor, group_size: int) -> int:
    """How many groups have all-equal rewards (and so zero advantage, no gradient)."""
    return int(_is_constant(_groups(rewards, group_size)).sum().item())


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """``(r - group mean) / (group sample std + 1e-4)``; an all-equal group gets exactly 0."""
    g = _groups(rewards, group_size, min_size=2)  # (P, G); the sample std needs G >= 2
    mean = g.mean(dim=1, keepdim=True)  # (P, 1)
    std = g.std(dim=1, keepdim=True)  # (P, 1), Bessel-corrected
    adv = (g - mean) / (std + GRPO_STD_EPS)  # (P, G)
    return torch.where(_is_constant(g), torch.zeros_like(adv), adv).view(-1)  # (N,)


@ADVANTAGES.register("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """``r - group mean`` (no std normalisation); an all-equal group gets exactly 0."""
    g = _groups(rewards, group_size)  # (P, G)
    adv = g - g.mean(dim=1, keepdim=True)  # (P, G)
    return torch.where(_is_constant(g), torch.zeros_like(adv), adv).view(-1)  # (N,)


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """``r_i - mean of the other G-1 rewards``; an all-equal group gets exactly 0."""
    g = _groups(rewards, group_size, min_size=2)  # (P, G); needs at least one "other"
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)  # (P, G)
    adv = g - others_mean  # (P, G)
    return torch.where(_is_constant(g), torch.zeros_like(adv), adv).view(-1)  # (N,)
