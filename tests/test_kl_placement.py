"""KL estimator x placement: the value and gradient of each combination by hand, and the
documented gradient bias of k3 in the loss, by exact enumeration on a categorical."""

from __future__ import annotations

import math

import pytest
import torch

from ahamoment.rl import KL_ESTIMATORS, KL_PLACEMENTS, POLICY_LOSSES, LossConfig

torch.set_num_threads(1)

F64 = torch.float64
LN2 = math.log(2.0)
C = 0.1  # kl_coef

# B=2, T=2. Seq 0: logp - ref = [ln 2, -ln 2] (pi/pi_ref = 2 and 1/2); seq 1: [ln 2] + a pad
# (the pad holds garbage in logp and ref; it must not count anywhere).
LOGP = [[math.log(0.5), math.log(0.25)], [math.log(0.5), -7.0]]
REF = [[math.log(0.25), math.log(0.5)], [math.log(0.25), 3.0]]
MASK = [[1.0, 1.0], [1.0, 0.0]]

# Per-token estimates at x = logp - ref = +-ln 2 (d = ref - logp = -x):
#   k1 = x:                  ln 2, -ln 2
#   k2 = x^2 / 2:            (ln 2)^2 / 2 both
#   k3 = e^d - d - 1:        x = ln 2: 1/2 + ln 2 - 1 = ln 2 - 1/2;
#                            x = -ln 2: 2 - ln 2 - 1 = 1 - ln 2
# and their derivatives w.r.t. logp:
#   k1: 1;   k2: x = +-ln 2;   k3: 1 - e^d = 1 - pi_ref/pi = 1/2 (x = ln 2), -1 (x = -ln 2)
ESTIMATES = {
    "k1": ([LN2, -LN2], [LN2]),
    "k2": ([LN2**2 / 2, LN2**2 / 2], [LN2**2 / 2]),
    "k3": ([LN2 - 0.5, 1 - LN2], [LN2 - 0.5]),
}
DERIVATIVES = {
    "k1": ([1.0, 1.0], [1.0]),
    "k2": ([LN2, -LN2], [LN2]),
    "k3": ([0.5, -1.0], [0.5]),
}


def _inputs():
    logp = torch.tensor(LOGP, dtype=F64, requires_grad=True)
    return logp, torch.tensor(REF, dtype=F64), torch.tensor(MASK, dtype=F64)


def test_placement_names() -> None:
    assert KL_PLACEMENTS.names() == ["loss", "reward"]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimator_values(estimator: str) -> None:
    logp, ref, mask = _inputs()
    kl = KL_ESTIMATORS.get(estimator)(logp, ref).detach()
    (s0, s1) = ESTIMATES[estimator]
    torch.testing.assert_close(kl[0], torch.tensor(s0, dtype=F64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(kl[1, :1], torch.tensor(s1, dtype=F64), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_loss(estimator: str) -> None:
    # "loss": rewards untouched, the loss gets kl_coef * kl_t per token. Through grpo with zero
    # advantage (ratio 1, so the policy term is -min(0, 0) = 0 with zero gradient) only the KL
    # acts: loss = C / N * sum_i mean_t kl_{i,t}, and
    # d loss / d logp_{i,t} = C * d kl / d logp / |o_i| / N, i.e. / 4 on seq 0, / 2 on seq 1.
    logp, ref, mask = _inputs()
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    kl = KL_ESTIMATORS.get(estimator)(logp, ref)
    shaped, coef = KL_PLACEMENTS.get("loss")(rewards, kl, mask, C)
    assert coef == C
    assert torch.equal(shaped, rewards)

    cfg = LossConfig(kl_coef=coef)
    loss, stats = POLICY_LOSSES.get("grpo")(
        logp, logp.detach(), torch.zeros(2, dtype=F64), mask, cfg, kl
    )
    loss.backward()
    (e0, e1), (d0, d1) = ESTIMATES[estimator], DERIVATIVES[estimator]
    # k1: C (0 + ln 2) / 2;  k2: C ((ln 2)^2 / 2 + (ln 2)^2 / 2) / 2;  k3: C (1/4 + ln 2 - 1/2) / 2
    assert math.isclose(loss.item(), C * (sum(e0) / 2 + e1[0]) / 2, rel_tol=1e-14)
    expected = torch.tensor([[C * d0[0] / 4, C * d0[1] / 4], [C * d1[0] / 2, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-14, atol=0)
    assert logp.grad[1, 1].item() == 0.0
    assert math.isclose(stats["kl"], (sum(e0) + e1[0]) / 3, rel_tol=1e-14, abs_tol=1e-15)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_reward(estimator: str) -> None:
    # "reward": r_i - C * sum_t kl_{i,t} over unmasked tokens, detached; the loss coef is 0.
    #   k1: seq 0 sum ln 2 - ln 2 = 0 -> 1;  seq 1 ln 2 -> -C ln 2
    #   k2: seq 0 (ln 2)^2 -> 1 - C (ln 2)^2;  seq 1 -> -C (ln 2)^2 / 2
    #   k3: seq 0 (ln 2 - 1/2) + (1 - ln 2) = 1/2 -> 1 - C/2;  seq 1 -> -C (ln 2 - 1/2)
    # (the pad's estimate, from the garbage -7 and 3, is left out).
    logp, ref, mask = _inputs()
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    kl = KL_ESTIMATORS.get(estimator)(logp, ref)
    assert kl.requires_grad
    shaped, coef = KL_PLACEMENTS.get("reward")(rewards, kl, mask, C)
    assert coef == 0.0
    assert not shaped.requires_grad and shaped.grad_fn is None  # a number, not a graph
    (e0, e1) = ESTIMATES[estimator]
    expected = torch.tensor([1.0 - C * sum(e0), 0.0 - C * e1[0]], dtype=F64)
    torch.testing.assert_close(shaped, expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(rewards, torch.tensor([1.0, 0.0], dtype=F64))  # not changed in place

    # With the returned coef 0 the loss has no KL term: zero advantage leaves exactly no
    # gradient (the penalty reaches the policy only through the advantages built from `shaped`).
    cfg = LossConfig(kl_coef=coef)
    loss, _ = POLICY_LOSSES.get("grpo")(
        logp, logp.detach(), torch.zeros(2, dtype=F64), mask, cfg, kl
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 2, dtype=F64))


# --- the gradient bias of k3 in the loss --------------------------------------------------
# pi = softmax(theta) = [1/2, 1/4, 1/4], pi_ref = [1/4, 1/4, 1/2]; l = log(pi / pi_ref) =
# [ln 2, 0, -ln 2]. With d log pi(x) / d theta = e_x - pi, the expected gradient of an
# estimator f over x ~ pi, samples held fixed, is sum_x pi(x) f'(log pi(x)) (e_x - pi):
#   k1 (f' = 1):             sum_x pi(x) (e_x - pi) = pi - pi = 0
#   k2 (f' = l):             pi * (l - E_pi l), E_pi l = ln2/2 - ln2/4 = ln2/4:
#                            [3/8 ln 2, -1/16 ln 2, -5/16 ln 2] = grad KL(pi || pi_ref)
#   k3 (f' = 1 - pi_ref/pi): sum_x (pi(x) - pi_ref(x)) (e_x - pi) = pi - pi_ref = [1/4, 0, -1/4]
#                            = grad of the reverse KL(pi_ref || pi) = -sum_x pi_ref(x) (e_x - pi)
PI = [0.5, 0.25, 0.25]
PI_REF = [0.25, 0.25, 0.5]


def _expected_estimator_grad(estimator: str) -> torch.Tensor:
    theta = torch.tensor(PI, dtype=F64).log().requires_grad_(True)
    ref = torch.tensor(PI_REF, dtype=F64).log()
    logpi = torch.log_softmax(theta, 0)
    f = KL_ESTIMATORS.get(estimator)(logpi[None], ref[None])[0]  # (3,): f at each outcome
    (logpi.exp().detach() * f).sum().backward()  # sum_x pi(x) * d f(log pi(x)) / d theta
    return theta.grad


def _analytic_grad(reverse: bool) -> torch.Tensor:
    theta = torch.tensor(PI, dtype=F64).log().requires_grad_(True)
    logpi = torch.log_softmax(theta, 0)
    logref = torch.tensor(PI_REF, dtype=F64).log()
    if reverse:  # KL(pi_ref || pi)
        kl = (logref.exp() * (logref - logpi)).sum()
    else:  # KL(pi || pi_ref)
        kl = (logpi.exp() * (logpi - logref)).sum()
    kl.backward()
    return theta.grad


def test_k3_in_loss_has_the_reverse_kl_gradient() -> None:
    true = _analytic_grad(reverse=False)
    reverse = _analytic_grad(reverse=True)
    # the analytic gradients themselves, against the hand values above
    torch.testing.assert_close(
        true, torch.tensor([3 / 8, -1 / 16, -5 / 16], dtype=F64) * LN2, rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        reverse, torch.tensor([0.25, 0.0, -0.25], dtype=F64), rtol=1e-12, atol=1e-15
    )

    k1, k2, k3 = (_expected_estimator_grad(k) for k in ("k1", "k2", "k3"))
    # exact sums of 3 terms in float64: 1e-12 is many ulps of margin
    torch.testing.assert_close(k1, torch.zeros(3, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(k2, true, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(k3, reverse, rtol=1e-12, atol=1e-15)
    assert (k3 - true).abs().max() > 0.01  # biased: [1/4, 0, -1/4] vs [.26, -.043, -.217]
