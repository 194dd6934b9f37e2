"""DAPO's group filters and overlong handlers, with hand-worked values."""

from __future__ import annotations

import pytest
import torch

from ahamoment.rl import GROUP_FILTERS, OVERLONG, OverlongConfig

torch.set_num_threads(1)

F64 = torch.float64


def test_registry_names() -> None:
    assert GROUP_FILTERS.names() == ["all", "nonconstant"]
    assert OVERLONG.names() == ["mask", "none", "soft"]


def test_group_filter_all() -> None:
    # 12 rewards in groups of 3 -> 4 groups, every one kept (constant ones included)
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 0, 0, 0.1], dtype=F64)
    assert GROUP_FILTERS.get("all")(rewards, 3).tolist() == [True, True, True, True]
    assert GROUP_FILTERS.get("all")(rewards, 3).dtype == torch.bool


def test_group_filter_nonconstant() -> None:
    # groups [1,1,1] constant -> drop; [0,1,0] -> keep; [.5,.5,.5] constant -> drop;
    # [0,0,.1] -> keep (one differing reward is enough)
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 0, 0, 0.1], dtype=F64)
    assert GROUP_FILTERS.get("nonconstant")(rewards, 3).tolist() == [False, True, False, True]
    # groups of 2: [1,1] drop, [1,0] keep, [1,0] keep, [.5,.5] drop, [.5,0] keep, [0,.1] keep
    assert GROUP_FILTERS.get("nonconstant")(rewards, 2).tolist() == [
        False,
        True,
        True,
        False,
        True,
        True,
    ]
    # equality is exact: a difference of 1e-12 is a nonconstant group (its advantages are not 0)
    tiny = torch.tensor([0.3, 0.3 + 1e-12, 0.0, 0.0], dtype=F64)
    assert GROUP_FILTERS.get("nonconstant")(tiny, 2).tolist() == [True, False]


def _lengths_case():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0], dtype=F64)
    lengths = torch.tensor([3, 6, 7, 8, 10, 10])
    truncated = torch.tensor([False, False, False, False, True, False])
    return rewards, lengths, truncated


def test_overlong_none() -> None:
    rewards, lengths, truncated = _lengths_case()
    shaped, in_loss = OVERLONG.get("none")(rewards, lengths, truncated, OverlongConfig(10, 4))
    assert torch.equal(shaped, rewards)
    assert in_loss.dtype == torch.bool and in_loss.tolist() == [True] * 6


def test_overlong_mask() -> None:
    # only the truncated row (index 4) leaves the loss; rewards unchanged. Row 5 has the full
    # length 10 but stopped by itself (finish "stop"), so it stays.
    rewards, lengths, truncated = _lengths_case()
    shaped, in_loss = OVERLONG.get("mask")(rewards, lengths, truncated, OverlongConfig(10, 4))
    assert torch.equal(shaped, rewards)
    assert in_loss.dtype == torch.bool
    assert in_loss.tolist() == [True, True, True, True, False, True]


@pytest.mark.parametrize("penalty", [1.0, 0.5])
def test_overlong_soft_ramp(penalty: float) -> None:
    # L = 10, C = 4: no penalty up to L - C = 6 tokens, then penalty * (6 - |o|) / 4:
    #   |o| = 3 -> 0;  6 -> 0;  7 -> -1/4;  8 -> -1/2;  10 -> -1   (times the penalty)
    # added to rewards [1, 0, 1, .5, 0, 1]; truncated or not, every row stays in the loss.
    # Quarters and halves are exact in binary, so equality is exact.
    rewards, lengths, truncated = _lengths_case()
    shaped, in_loss = OVERLONG.get("soft")(
        rewards, lengths, truncated, OverlongConfig(10, 4, penalty)
    )
    ramp = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0], dtype=F64)
    assert torch.equal(shaped, rewards + penalty * ramp)
    assert shaped.dtype == F64
    assert in_loss.tolist() == [True] * 6


def test_overlong_soft_edges() -> None:
    # buffer = max_len = 4: the ramp starts at 0 tokens: |o| = 0, 1, 2, 4 -> 0, -1/4, -1/2, -1.
    # A length past L (generation stops at L, so only by misuse) stays at the full -penalty.
    rewards = torch.zeros(5, dtype=F64)
    lengths = torch.tensor([0, 1, 2, 4, 6])
    shaped, _ = OVERLONG.get("soft")(
        rewards, lengths, torch.zeros(5, dtype=torch.bool), OverlongConfig(4, 4, 2.0)
    )
    assert shaped.tolist() == [0.0, -0.5, -1.0, -2.0, -2.0]
    # penalty 0 switches it off
    shaped, _ = OVERLONG.get("soft")(
        rewards, lengths, torch.zeros(5, dtype=torch.bool), OverlongConfig(4, 2, 0.0)
    )
    assert shaped.tolist() == [0.0] * 5


def test_overlong_config_validation() -> None:
    default = OverlongConfig(32)
    assert (default.buffer, default.penalty) == (16, 1.0)
    OverlongConfig(10, 10)  # buffer == max_len is allowed
    OverlongConfig(10, 1, 0.0)  # the smallest buffer, no penalty
    with pytest.raises(ValueError, match="overlong buffer"):
        OverlongConfig(10, 0)
    with pytest.raises(ValueError, match="overlong buffer"):
        OverlongConfig(10, -2)
    with pytest.raises(ValueError, match="penalty"):
        OverlongConfig(10, 4, -0.1)


def test_soft_buffer_longer_than_budget_ramps_from_zero() -> None:
    # max_len 4 with the default buffer 16: the buffer is cut to 4, so the ramp starts at 0
    # tokens: lengths 0, 1, 2, 4 -> penalties 0, 1/4, 1/2, 1.
    rewards = torch.zeros(4, dtype=torch.float64)
    lengths = torch.tensor([0, 1, 2, 4])
    shaped, keep = OVERLONG.get("soft")(
        rewards, lengths, torch.zeros(4, dtype=torch.bool), OverlongConfig(4)
    )
    assert shaped.tolist() == [0.0, -0.25, -0.5, -1.0] and keep.all()
