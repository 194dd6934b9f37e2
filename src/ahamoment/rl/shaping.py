"""What DAPO adds around the loss: dynamic sampling (group filters) and overlong handling.

Both act on a rollout batch of ``B = P * G`` completions before advantages are computed.

Group filters (``GROUP_FILTERS``) map ``rewards (B,)`` and ``G`` to a ``(P,)`` bool of the
groups to keep. ``"all"`` keeps every group; ``"nonconstant"`` is DAPO's dynamic sampling: a
group whose rewards are all equal has zero advantage under every estimator, so it only dilutes
the batch; the trainer drops it and samples fresh prompts to refill the batch, up to a cap of
sampling rounds (DAPO over-samples until full; the cap bounds the cost on a 2-core machine).

Overlong handlers (``OVERLONG``) map ``rewards (B,)``, completion ``lengths (B,)`` and
``truncated (B,)`` bool to new rewards and a ``(B,)`` bool of completions that stay in the
loss:

- ``"none"``: unchanged.
- ``"mask"``: DAPO's overlong filtering; a truncated completion is left out of the loss, since
  its missing answer is the budget's fault, not necessarily the reasoning's.
- ``"soft"``: DAPO's soft overlong punishment, with ``L = max_new_tokens`` and the buffer
  ``C = cfg.buffer``: 0 up to ``L - C`` tokens, then a linear ramp to ``-cfg.penalty`` at ``L``:
  ``penalty * ((L - C) - |o|) / C``. Deviation: the paper also gives ``-1`` past ``L``;
  generation stops at ``L`` here, so ``|o| <= L`` and the ramp's end is that value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ahamoment.registry import Registry

GroupFilter = Callable[[Tensor, int], Tensor]
GROUP_FILTERS: Registry[GroupFilter] = Registry("group filter")


@GROUP_FILTERS.register("all")
def keep_all_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Every group: ``(P,)`` all True."""
    return torch.ones(rewards.numel() // group_size, dtype=torch.bool)


@GROUP_FILTERS.register("nonconstant")
def keep_nonconstant_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: ``(P,)`` True where the group's rewards are not all equal."""
    g = rewards.view(-1, group_size)  # (P, G)
    return ~(g == g[:, :1]).all(dim=1)


@dataclass
class OverlongConfig:
    """Settings of the overlong handlers."""

    max_len: int
    """L: the generation budget (``max_new_tokens``)."""
    buffer: int = 16
    """C: tokens before L where the soft penalty ramps from 0 to its full size (at most L)."""
    penalty: float = 1.0
    """Size of the soft penalty at L (a reward of 1 is a correct answer)."""

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError(f"overlong buffer must be at least 1 token, got {self.buffer}")
        if self.penalty < 0:
            raise ValueError(f"overlong penalty must be >= 0, got {self.penalty}")


OverlongFn = Callable[[Tensor, Tensor, Tensor, OverlongConfig], tuple[Tensor, Tensor]]
OVERLONG: Registry[OverlongFn] = Registry("overlong handler")


@OVERLONG.register("none")
def overlong_none(
    rewards: Tensor, lengths: Tensor, truncated: Tensor, cfg: OverlongConfig
) -> tuple[Tensor, Tensor]:
    """Rewards unchanged, every completion in the loss."""
    return rewards, torch.ones_like(truncated, dtype=torch.bool)


@OVERLONG.register("mask")
def overlong_mask(
    rewards: Tensor, lengths: Tensor, truncated: Tensor, cfg: OverlongConfig
) -> tuple[Tensor, Tensor]:
    """Truncated completions are left out of the loss; rewards unchanged."""
    return rewards, ~truncated.bool()


@OVERLONG.register("soft")
def overlong_soft(
    rewards: Tensor, lengths: Tensor, truncated: Tensor, cfg: OverlongConfig
) -> tuple[Tensor, Tensor]:
    """``r + penalty * min(0, ((L - C) - |o|) / C)``; every completion stays in the loss."""
    buffer = min(cfg.buffer, cfg.max_len)  # a buffer longer than the budget ramps from 0 tokens
    start = cfg.max_len - buffer
    over = (lengths.to(rewards.dtype) - start).clamp(min=0.0)  # (B,) tokens into the buffer
    shaped = rewards - cfg.penalty * (over / buffer).clamp(max=1.0)
    return shaped, torch.ones_like(truncated, dtype=torch.bool)
