"""KL estimators: values and gradients w.r.t. logp, by hand."""

from __future__ import annotations

import math

import torch

from ahamoment.rl import KL_ESTIMATORS

LN2 = math.log(2.0)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # Token 0: pi = .5, pi_ref = .25 -> logp - ref_logp = ln 2.
    # Token 1: pi = pi_ref = .5       -> every estimator and its gradient is 0 (k1 gradient 1).
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    return logp, ref


def _value_and_grad(name: str) -> tuple[list[float], list[float]]:
    logp, ref = _inputs()
    kl = KL_ESTIMATORS.get(name)(logp, ref)
    kl.sum().backward()
    assert logp.grad is not None
    return kl.detach()[0].tolist(), logp.grad[0].tolist()


def test_registry_names() -> None:
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


def test_k1() -> None:
    # k1 = logp - ref = ln 2 = .6931; d/dlogp = 1 on every token.
    value, grad = _value_and_grad("k1")
    assert math.isclose(value[0], LN2, rel_tol=1e-15) and value[1] == 0.0
    assert grad == [1.0, 1.0]


def test_k2() -> None:
    # k2 = (ln 2)^2 / 2 = .2402; d/dlogp = logp - ref = ln 2.
    value, grad = _value_and_grad("k2")
    assert math.isclose(value[0], LN2**2 / 2, rel_tol=1e-15)
    assert math.isclose(grad[0], LN2, rel_tol=1e-15)
    assert value[1] == 0.0 and grad[1] == 0.0


def test_k3() -> None:
    # d = ref - logp = -ln 2: k3 = e^{-ln 2} - (-ln 2) - 1 = .5 + .6931 - 1 = .1931;
    # d/dlogp = -e^{d} + 1 = 1 - pi_ref/pi = 1 - .5 = .5.
    value, grad = _value_and_grad("k3")
    assert math.isclose(value[0], 0.5 + LN2 - 1, rel_tol=1e-14)
    assert math.isclose(grad[0], 0.5, rel_tol=1e-14)
    assert value[1] == 0.0 and grad[1] == 0.0


def test_k2_k3_nonnegative_k1_not() -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 3
    assert (KL_ESTIMATORS.get("k2")(logp, ref) >= 0).all()
    assert (KL_ESTIMATORS.get("k3")(logp, ref) >= 0).all()
    assert (KL_ESTIMATORS.get("k1")(logp, ref) < 0).any()
