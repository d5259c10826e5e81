"""Ternary (and binary) quantisers, the ternary tanh continuation and its beta schedule.

The training-side member of the op vocabulary of docs/kernels.md: what the engine computes with
popcount on {-1, 0, +1}, training computes here with straight-through or continued gradients.

Variants (one option selects them, `VARIANTS`):
- ``fp32``         no quantisation (ReLU activations): the full-precision baseline;
- ``binary``       weights alpha*sign(w), activations sign(x), straight-through gradients;
- ``ternary-ste``  TWN weights, hard ternary activations with a straight-through gradient;
- ``ternary-tanh`` TWN weights, activations by the ternary tanh continuation f_beta during training
                   (beta rising over the epochs) and hard ternary at evaluation and export.
"""

from dataclasses import dataclass

import torch

VARIANTS = ("fp32", "binary", "ternary-ste", "ternary-tanh")
TWN_DELTA = 0.7  # Ternary Weight Networks (arXiv 1605.04711): threshold = 0.7 * mean |w| per filter
STE_CLIP = 1.5   # straight-through gradients pass where |x| <= 1.5 (beyond the outer step at +-1/2)


def check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


# --------------------------------------------------------------------------------- weights

def twn_ternarize(w):
    """Per output filter: T = sign(w) * [|w| > delta], delta = 0.7 mean|w|, alpha = mean |w| over T != 0.

    Returns (T, alpha): T int8-valued float tensor like w, alpha of shape (Cout,). A filter with no
    weight above delta gets alpha = 0 (it contributes nothing).
    """
    flat = w.detach().reshape(w.shape[0], -1)
    delta = TWN_DELTA * flat.abs().mean(dim=1, keepdim=True)
    mask = flat.abs() > delta
    kept = mask.sum(dim=1).clamp(min=1)
    alpha = (flat.abs() * mask).sum(dim=1) / kept
    ternary = torch.sign(flat) * mask
    return ternary.reshape(w.shape), alpha


def binarize(w):
    """Per output filter: T = sign(w) (+1 for 0), alpha = mean |w|."""
    flat = w.detach().reshape(w.shape[0], -1)
    alpha = flat.abs().mean(dim=1)
    ternary = torch.where(flat >= 0, 1.0, -1.0).to(w.dtype)
    return ternary.reshape(w.shape), alpha


class _QuantizeWeights(torch.autograd.Function):
    """alpha * T in the forward pass, identity gradient (straight-through) in the backward pass."""

    @staticmethod
    def forward(ctx, w, kind):
        ternary, alpha = twn_ternarize(w) if kind == "ternary" else binarize(w)
        return ternary * alpha.reshape((-1,) + (1,) * (w.dim() - 1))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize_weights(w, variant):
    """Weights as the variant's forward pass sees them (float tensor, differentiable by STE)."""
    if variant == "fp32":
        return w
    return _QuantizeWeights.apply(w, "binary" if variant == "binary" else "ternary")


# ----------------------------------------------------------------------------- activations

def ternary_tanh(x, beta):
    """The ternary tanh continuation f_beta(x) = 1/2 [tanh(beta (2x - 1)) + tanh(beta (2x + 1))]:
    a smooth double step at +-1/2 that tends to hard_ternary as beta grows."""
    return 0.5 * (torch.tanh(beta * (2 * x - 1)) + torch.tanh(beta * (2 * x + 1)))


def hard_ternary(x):
    """sign(x) * [|x| > 1/2]: the activation the engine computes with integer thresholds."""
    return torch.sign(x) * (x.abs() > 0.5).to(x.dtype)


def hard_binary(x):
    """+1 for x >= 0, -1 otherwise (never 0)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _StraightThrough(torch.autograd.Function):
    """A hard step in the forward pass, gradient 1 where |x| <= STE_CLIP, 0 beyond."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.save_for_backward(x)
        return hard_binary(x) if kind == "binary" else hard_ternary(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= STE_CLIP).to(grad.dtype), None


class Activation(torch.nn.Module):
    """The variant's activation. ``beta`` is set by the training loop (ternary-tanh only)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = check_variant(variant)
        self.beta = 3.0

    def forward(self, x):
        if self.variant == "fp32":
            return torch.relu(x)
        if self.variant == "ternary-tanh":
            return ternary_tanh(x, self.beta) if self.training else hard_ternary(x)
        return _StraightThrough.apply(x, "binary" if self.variant == "binary" else "ternary")

    def extra_repr(self):
        return f"variant={self.variant}" + (f", beta={self.beta:.3g}" if self.variant == "ternary-tanh" else "")


@dataclass(frozen=True)
class BetaSchedule:
    """beta rising linearly from ``start`` (first epoch) to ``end`` (last epoch).

    The paper's public code meant 3 -> 8 over 40 epochs, but its beta never changed; here it does,
    and the training loop logs it per epoch.
    """

    start: float = 3.0
    end: float = 8.0

    def __call__(self, epoch, epochs):
        if epochs <= 1:
            return float(self.end)
        t = min(max(epoch / (epochs - 1), 0.0), 1.0)
        return float(self.start + (self.end - self.start) * t)


def set_beta(model, beta):
    """Set beta of every Activation in ``model``."""
    for module in model.modules():
        if isinstance(module, Activation):
            module.beta = float(beta)
