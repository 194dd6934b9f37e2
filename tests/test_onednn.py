"""``onednn.linear``: F.linear's values and gradients, on and off, against float64."""

from __future__ import annotations

import pytest
import torch

from ahamoment import lora_linear, onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN is unavailable here")


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    """oneDNN's path whatever this CPU's default (off on Intel's: ``on_by_default``)."""
    monkeypatch.setattr(onednn, "ENABLED", True)


@pytest.mark.parametrize(
    "env, vendor, on",
    [
        (None, "AuthenticAMD", True),
        (None, "GenuineIntel", False),  # MKL's tuned path
        (None, "", True),
        ("", "GenuineIntel", False),
        ("1", "GenuineIntel", True),
        (" 0 ", "AuthenticAMD", False),
    ],
)
def test_default_is_off_on_intel_unless_the_environment_says(env, vendor, on):
    assert onednn.on_by_default(env, vendor) is on


def test_a_bad_environment_value_is_named():
    with pytest.raises(ValueError, match="AHAMOMENT_ONEDNN must be 0 .* got 'yes'"):
        onednn.on_by_default("yes", "AuthenticAMD")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 24), (3, 15, 24)])
def test_linear_matches_float64_values_and_gradients(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    up = torch.randn(*shape[:-1], 40, generator=g)
    y = onednn.linear(x, w, b)
    (y * up).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    (y64 * up.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_weights_changed_in_place_are_read_again():
    """Nothing is cached by weight: an optimizer step in place shows in the next product."""
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    assert onednn.applies(x, w)
    before = onednn.linear(x, w)
    w.mul_(2)
    torch.testing.assert_close(onednn.linear(x, w), 2 * before)


def test_off_means_torch_own(monkeypatch):
    x, w = torch.randn(40, 8), torch.randn(3, 8)
    monkeypatch.setattr(onednn, "ENABLED", False)
    assert not onednn.applies(x, w)
    assert onednn.padded_rows(65) == 65
    assert torch.equal(onednn.linear(x, w), torch.nn.functional.linear(x, w))
    monkeypatch.setattr(onednn, "ENABLED", True)
    assert onednn.applies(x, w) and not onednn.applies(x.double(), w.double())
    assert not onednn.applies(x[: onednn.MIN_ROWS - 1], w)  # too few rows: torch's own
    assert onednn.padded_rows(65) == 128 and onednn.padded_rows(0) == 0


def test_plain_linear_module_goes_through_onednn(monkeypatch):
    calls = []
    real = onednn.product
    monkeypatch.setattr(onednn, "product", lambda *a: calls.append(1) or real(*a))
    mod = torch.nn.Linear(8, 4)
    x = torch.randn(33, 8, requires_grad=True)
    y = lora_linear.linear(mod, x)
    y.sum().backward()
    torch.testing.assert_close(y, mod(x))
    assert len(calls) == 3  # forward, grad x, grad weight


def test_cpu_autocast_leaves_the_product_to_torch():
    """Under ``--bf16`` (CPU autocast) the product must run in bf16, as torch's own would."""
    x, w = torch.randn(40, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.applies(x, w)
        assert onednn.linear(x, w).dtype == torch.bfloat16


def test_long_inputs_run_in_blocks_with_the_same_values(monkeypatch):
    """Rows beyond BLOCK run in blocks (one kernel shape); values and gradients as one product."""
    monkeypatch.setattr(onednn, "BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(53, 12, generator=g, requires_grad=True)
    w = torch.randn(7, 12, generator=g, requires_grad=True)
    shapes = []
    real = onednn.product
    monkeypatch.setattr(onednn, "product", lambda a, *r: shapes.append(a.shape) or real(a, *r))
    y = onednn.linear(x, w)
    up = torch.randn(53, 7, generator=g)
    (y * up).sum().backward()
    assert shapes[:4] == [(16, 12)] * 3 + [(5, 12)]
    x64, w64 = x.detach().double(), w.detach().double()
    torch.testing.assert_close(y.double(), x64 @ w64.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), up.double() @ w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), up.double().T @ x64, rtol=1e-5, atol=1e-5)
