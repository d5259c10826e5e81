"""Quantisers, the ternary tanh continuation, the beta schedule and the threshold folding."""

import math

import numpy as np
import pytest
import torch

from training.export import float_thresholds, integer_thresholds
from training.ternary import (VARIANTS, Activation, BetaSchedule, binarize, hard_ternary, quantize_weights,
                              set_beta, ternary_tanh, twn_ternarize)


@pytest.mark.parametrize("beta", [0.5, 3.0, 8.0])
def test_ternary_tanh_values_and_analytic_gradient(beta):
    x = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    y = ternary_tanh(x, beta)
    expected = 0.5 * (np.tanh(beta * (2 * x.detach().numpy() - 1)) + np.tanh(beta * (2 * x.detach().numpy() + 1)))
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(y.sum(), x)
    sech2 = lambda u: 1.0 / np.cosh(u) ** 2  # noqa: E731
    xn = x.detach().numpy()
    analytic = beta * (sech2(beta * (2 * xn - 1)) + sech2(beta * (2 * xn + 1)))
    np.testing.assert_allclose(grad.numpy(), analytic, rtol=1e-10, atol=1e-12)


def test_ternary_tanh_tends_to_hard_ternary():
    x = torch.tensor([-1.3, -0.7, -0.3, 0.0, 0.3, 0.7, 1.3], dtype=torch.float64)
    np.testing.assert_allclose(ternary_tanh(x, 200.0).numpy(), hard_ternary(x).numpy(), atol=1e-9)
    assert hard_ternary(torch.tensor([0.5, -0.5, 0.5001, -0.5001])).tolist() == [0.0, 0.0, 1.0, -1.0]


def test_beta_schedule_really_changes():
    schedule = BetaSchedule(3.0, 8.0)
    betas = [schedule(e, 40) for e in range(40)]
    assert betas[0] == 3.0 and betas[-1] == 8.0
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))
    assert betas[20] == pytest.approx(3.0 + 5.0 * 20 / 39)
    assert schedule(0, 1) == 8.0


def test_set_beta_reaches_every_activation():
    model = torch.nn.Sequential(Activation("ternary-tanh"), torch.nn.Sequential(Activation("ternary-tanh")))
    set_beta(model, 5.5)
    assert [m.beta for m in model.modules() if isinstance(m, Activation)] == [5.5, 5.5]


def test_twn_on_known_tensor():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.05], [0.0, 0.0, 0.0, 0.0]])
    ternary, alpha = twn_ternarize(w)
    # mean|w| = 0.3875, delta = 0.27125: keep -0.9 and 0.5, alpha = (0.9 + 0.5) / 2
    assert ternary[0].tolist() == [0.0, -1.0, 1.0, 0.0]
    assert alpha[0].item() == pytest.approx(0.7)
    assert ternary[1].tolist() == [0.0] * 4 and alpha[1].item() == 0.0
    q = quantize_weights(w, "ternary-tanh")
    np.testing.assert_allclose(q[0].numpy(), [0.0, -0.7, 0.7, 0.0], atol=1e-7)


def test_binarize_on_known_tensor():
    ternary, alpha = binarize(torch.tensor([[0.2, -0.4, 0.0, 0.6]]))
    assert ternary[0].tolist() == [1.0, -1.0, 1.0, 1.0]
    assert alpha[0].item() == pytest.approx(0.3)


@pytest.mark.parametrize("variant", ["binary", "ternary-ste", "ternary-tanh"])
def test_weight_ste_passes_gradient_unchanged(variant):
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    upstream = torch.randn(4, 3, 3, 3, 3)
    (quantize_weights(w, variant) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)


@pytest.mark.parametrize("variant", ["binary", "ternary-ste"])
def test_activation_ste_gradient_is_clipped_identity(variant):
    act = Activation(variant).train()
    x = torch.tensor([-2.0, -1.5, -0.7, -0.2, 0.0, 0.4, 0.9, 1.5, 1.6], requires_grad=True)
    y = act(x)
    expected_forward = ([-1, -1, -1, -1, 1, 1, 1, 1, 1] if variant == "binary"
                        else [-1, -1, -1, 0, 0, 0, 1, 1, 1])
    assert y.tolist() == expected_forward
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0]


def test_ternary_tanh_activation_train_vs_eval():
    act = Activation("ternary-tanh")
    act.beta = 3.0
    x = torch.tensor([-0.9, -0.4, 0.1, 0.6])
    act.train()
    soft = act(x)
    assert not set(soft.tolist()) <= {-1.0, 0.0, 1.0}
    act.eval()
    assert act(x).tolist() == [-1.0, 0.0, 0.0, 1.0]
    assert set(VARIANTS) == {"fp32", "binary", "ternary-ste", "ternary-tanh"}


def test_integer_thresholds_match_float_activation_exhaustively():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(0, 0.05, 60), [0.0, 0.0, 0.0, 1e-9, -0.25]])
    b = np.concatenate([rng.normal(0, 2.0, 60), [0.7, -0.9, 0.1, 0.0, 1.25]])
    acc = np.arange(-400, 401)
    for binary in (False, True):
        lo, hi, flip = integer_thresholds(a, b, binary)
        for c in range(len(a)):
            acc_c = -acc if flip[c] else acc  # the exported filter is negated: the engine sees -acc
            y = a[c] * acc + b[c]
            want = np.where(y >= 0, 1, -1) if binary else np.where(y > 0.5, 1, np.where(y < -0.5, -1, 0))
            got = np.where(acc_c > hi[c], 1, np.where(acc_c < lo[c], -1, 0))
            assert np.array_equal(got, want), (binary, c, a[c], b[c])


def test_float_thresholds_match_float_activation():
    rng = np.random.default_rng(1)
    s = np.concatenate([rng.normal(0, 2, 40), [0.0, 0.0]])
    t = np.concatenate([rng.normal(0, 1, 40), [0.9, -0.2]])
    acc = rng.normal(0, 2, 2000).astype(np.float32)
    for binary in (False, True):
        lo, hi, flip = float_thresholds(s, t, binary)
        for c in range(len(s)):
            acc_c = -acc if flip[c] else acc
            y = s[c] * acc.astype(np.float64) + t[c]
            want = np.where(y >= 0, 1, -1) if binary else np.where(y > 0.5, 1, np.where(y < -0.5, -1, 0))
            got = np.where(acc_c > hi[c], 1, np.where(acc_c < lo[c], -1, 0))
            # float32 thresholds may differ from the float64 decision only within rounding of the edge
            edge = np.abs(np.abs(y) - (0.0 if binary else 0.5)) < 1e-5 * max(1.0, abs(s[c]))
            assert np.array_equal(got[~edge], want[~edge]), (binary, c)
    assert math.isfinite(float(lo.max())) and math.isfinite(float(hi.min()))
