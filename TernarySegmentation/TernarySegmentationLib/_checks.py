"""Argument checks shared by the kernels binding and the numpy reference.

Every public op validates here first, so the C code is never reached with a bad shape, and a
ValueError names the bad argument and what would be accepted.
"""

import numpy as np

from .packed import PackedWeights, TernaryMap

EPILOGUES = ("ternary", "float", "int32")


def as_triple(name, value, minimum=1):
    """An int or a sequence of 3 ints -> tuple of 3 ints >= minimum."""
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        triple = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
    if len(triple) != 3 or any(v < minimum for v in triple):
        raise ValueError(f"{name} must be an int or 3 ints, each >= {minimum}, got {value!r}")
    return triple


def check_array(name, a, dtype, ndim=None, shape=None):
    """A C-contiguous numpy array of exactly ``dtype`` (and ``ndim``/``shape`` when given)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    if a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    return a


def check_map(name, m):
    if not isinstance(m, TernaryMap):
        raise ValueError(f"{name} must be a TernaryMap, got {type(m).__name__}")
    return m


def check_channel_vector(name, v, channels, dtype):
    return check_array(name, v, dtype, shape=(channels,))


def check_ternary_weights(name, w):
    """int8 (Cout, Cin, kd, kh, kw) with values in {-1, 0, +1} and odd kernel sizes."""
    if isinstance(w, PackedWeights):
        return w.ternary
    check_array(name, w, np.int8, ndim=5)
    check_kernel_size(name, w.shape[2:])
    if w.min() < -1 or w.max() > 1:
        raise ValueError(f"{name} values must be in {{-1, 0, +1}}, got range [{w.min()}, {w.max()}]")
    return w


def check_kernel_size(name, kernel_size):
    if any(k < 1 or k % 2 == 0 or k > 255 for k in kernel_size):
        raise ValueError(f"{name} kernel sizes must be odd, 1..255, got {tuple(kernel_size)}")


def check_conv(x_channels, w_shape, stride, dilation, epilogue):
    """Common checks of a convolution call; returns (stride, dilation) triples."""
    if w_shape[1] != x_channels:
        raise ValueError(f"weights expect {w_shape[1]} input channels but x has {x_channels}")
    stride = as_triple("stride", stride)
    dilation = as_triple("dilation", dilation)
    if max(stride) > 255 or max(dilation) > 255:
        raise ValueError(f"stride and dilation must be <= 255, got {stride}, {dilation}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    taps = int(np.prod(w_shape[2:]))
    if taps * x_channels > 2**31 - 1:
        raise ValueError(f"taps x input channels = {taps * x_channels} overflows the int32 accumulator")
    return stride, dilation


def check_epilogue_args(epilogue, cout, lo, hi, scale, bias, threshold_dtype):
    """The per-channel vectors an epilogue needs; returns them as checked arrays (or None)."""
    if epilogue == "ternary":
        if lo is None or hi is None:
            raise ValueError("epilogue 'ternary' needs per-output-channel thresholds lo and hi")
        lo = check_channel_vector("lo", lo, cout, threshold_dtype)
        hi = check_channel_vector("hi", hi, cout, threshold_dtype)
    if epilogue == "float" and scale is not None:
        scale = check_channel_vector("scale", scale, cout, np.float32)
    if epilogue == "float" and bias is not None:
        bias = check_channel_vector("bias", bias, cout, np.float32)
    return lo, hi, scale, bias


def check_upsample_shape(shape, out_shape):
    if out_shape is None:
        return tuple(2 * n for n in shape)
    out_shape = tuple(int(n) for n in out_shape)
    if len(out_shape) != 3 or any((o + 1) // 2 != n or o < 1 for o, n in zip(out_shape, shape)):
        raise ValueError(f"out_shape must be 2n-1 or 2n of the input shape {shape} per axis, "
                         f"got {out_shape}")
    return out_shape


def check_classifier(x, weight, bias, tables):
    """The classifier's arguments: a map with C channels, float32 weight (K, C), bias (K,), and
    tables (channel bytes, 65536, K) float32 or None. Returns (weight, bias, tables)."""
    check_map("x", x)
    if isinstance(weight, np.ndarray):
        weight = np.ascontiguousarray(weight)  # small: a copy costs nothing
    check_array("weight", weight, np.float32, ndim=2)
    classes, channels = weight.shape
    if channels != x.channels:
        raise ValueError(f"classifier weight {weight.shape} and a map with {x.channels} channels do not fit")
    bias = check_channel_vector("bias", bias, classes, np.float32)
    if tables is not None:
        check_array("tables", tables, np.float32, shape=(x.data.shape[-1], 1 << 16, classes))
    return weight, bias, tables
