"""Advantage estimators, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ahamoment.rl import ADVANTAGES, count_constant_groups


def test_registry_names() -> None:
    assert ADVANTAGES.names() == ["dr_grpo", "grpo", "rloo"]


def test_grpo_hand_values() -> None:
    # Group 0: rewards [1,0,0,1] -> mean .5, deviations ±.5, sample std sqrt((4 * .25) / 3)
    # = sqrt(1/3) = .57735 -> A = ±.5 / (.57735 + 1e-4).
    # Group 1: [1,1,1,1] -> all equal -> exactly 0.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(ADVANTAGES.get("grpo")(r, 4), expected, rtol=0, atol=1e-12)


def test_dr_grpo_hand_values() -> None:
    # [1,0,0,1] -> mean .5 -> A = r - .5 = [.5,-.5,-.5,.5]; no division by the std.
    # [3,0] -> mean 1.5 -> [1.5,-1.5] (groups of 2 here).
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert ADVANTAGES.get("dr_grpo")(r, 4).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert ADVANTAGES.get("dr_grpo")(torch.tensor([3.0, 0.0]), 2).tolist() == [1.5, -1.5]


def test_rloo_hand_values() -> None:
    # [1,0,0,0]: A_0 = 1 - mean(0,0,0) = 1; A_j = 0 - mean(1,0,0) = -1/3 for j = 1..3.
    # Same as G/(G-1) * (r - mean) = 4/3 * (1 - .25) = 1 and 4/3 * (0 - .25) = -1/3.
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    torch.testing.assert_close(ADVANTAGES.get("rloo")(r, 4), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_group_is_exactly_zero(name: str) -> None:
    # 0.1 is not exact in binary; a float32 mean of three 0.1s need not equal 0.1 bit for bit,
    # so "exactly 0" must come from the estimator, not from luck in rounding.
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    out = ADVANTAGES.get(name)(r, 3)
    assert torch.equal(out, torch.zeros(6))


def test_count_constant_groups() -> None:
    # groups [1,1], [0,1], [0,0] -> two constant groups
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert count_constant_groups(r, 2) == 2
    assert count_constant_groups(r, 3) == 0  # [1,1,0], [1,0,0]


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        ADVANTAGES.get("grpo")(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        ADVANTAGES.get("grpo")(torch.zeros(3), 1)  # sample std needs two samples
    with pytest.raises(ValueError, match="group_size"):
        ADVANTAGES.get("rloo")(torch.zeros(3), 1)  # no "other" samples
    with pytest.raises(ValueError, match=r"\(N,\)"):
        ADVANTAGES.get("dr_grpo")(torch.zeros(2, 2), 2)
