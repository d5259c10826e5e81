"""The numpy oracle: every kernel op, obviously correct and slow, with the same names and arguments
as TernarySegmentationLib.kernels (which must equal it bit for bit). Used by tests and debugging."""

import numpy as np

from . import _checks
from .packed import OCTET, PackedWeights, TernaryMap, channel_bytes, conv_out_size, k_words


def _planes_to_map(q):
    """int8 (D, H, W, C) in {-1, 0, 1} -> TernaryMap."""
    mask = np.packbits(q != 0, axis=-1, bitorder="little")
    sign = np.packbits(q < 0, axis=-1, bitorder="little")
    return TernaryMap(np.ascontiguousarray(np.stack([mask, sign], axis=3)), q.shape[-1], validate=False)


def ternarize(x, lo, hi):
    """+1 where x > hi, -1 where x < lo, else 0 (NaN -> 0), per channel on the last axis."""
    return (x > hi).astype(np.int8) - ((x < lo) & ~(x > hi)).astype(np.int8)


def pack(x, lo, hi, threads=None):
    """float32 (D, H, W, C) -> TernaryMap with per-channel thresholds (lo, hi)."""
    _checks.check_array("x", x, np.float32, ndim=4)
    lo = _checks.check_channel_vector("lo", lo, x.shape[3], np.float32)
    hi = _checks.check_channel_vector("hi", hi, x.shape[3], np.float32)
    return _planes_to_map(ternarize(x, lo, hi))


def unpack(m, threads=None):
    """TernaryMap -> int8 (D, H, W, C) in {-1, 0, +1}."""
    _checks.check_map("m", m)
    mask = np.unpackbits(m.data[..., 0, :], axis=-1, count=m.channels, bitorder="little")
    sign = np.unpackbits(m.data[..., 1, :], axis=-1, count=m.channels, bitorder="little")
    return (mask.astype(np.int8) * (1 - 2 * sign.astype(np.int8))).astype(np.int8)


def pack_weights(w):
    """int8 (Cout, Cin, kd, kh, kw) -> PackedWeights (layout in packed.PackedWeights)."""
    w = _checks.check_ternary_weights("w", w)
    cout, cin = w.shape[:2]
    taps, cb, kw = int(np.prod(w.shape[2:])), channel_bytes(cin), k_words(cin, w.shape[2:])
    # K bits of filter f: tap t, channel c at bit t * 8*cb + c
    per_tap = np.zeros((cout, taps, 8 * cb), np.uint8)
    flat = w.reshape(cout, cin, taps).transpose(0, 2, 1)
    per_tap[:, :, :cin] = flat != 0
    mask_bits = per_tap.reshape(cout, -1).copy()
    per_tap[:, :, :cin] = flat < 0
    sign_bits = per_tap.reshape(cout, -1)
    noct = -(-cout // OCTET)
    words = np.zeros((noct * OCTET, 2, kw), np.uint64)
    for plane, bits in enumerate((mask_bits, sign_bits)):
        row = np.zeros((cout, kw * 8), np.uint8)
        packed = np.packbits(bits, axis=1, bitorder="little")
        row[:, :packed.shape[1]] = packed
        words[:cout, plane] = row.view("<u8").astype(np.uint64)
    words = words.reshape(noct, OCTET, 2, kw).transpose(0, 3, 2, 1)
    return PackedWeights(np.ascontiguousarray(words), w)


def _taps(x_padded, kernel_size, stride, dilation, out_shape):
    """Yield (tap index (a, b, c), strided input view of out_shape) for every kernel tap."""
    for a in range(kernel_size[0]):
        for b in range(kernel_size[1]):
            for c in range(kernel_size[2]):
                start = (a * dilation[0], b * dilation[1], c * dilation[2])
                view = x_padded[tuple(slice(s, s + (o - 1) * st + 1, st)
                                      for s, o, st in zip(start, out_shape, stride))]
                yield (a, b, c), view


def _pad_same(x, kernel_size, dilation):
    pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel_size, dilation)]
    return np.pad(x, pads + [(0, 0)])


def ternary_conv3d(x, w, stride=1, dilation=1, epilogue="ternary", lo=None, hi=None, scale=None,
                   bias=None, threads=None):
    """Ternary weights x packed ternary input, zero 'same' padding, out = ceil(in / stride).

    epilogue 'ternary': TernaryMap, +1 if acc > hi[c], -1 if acc < lo[c] (int32 thresholds);
    'float': float32 (D, H, W, Cout) = scale * acc + bias; 'int32': the raw accumulators.
    """
    _checks.check_map("x", x)
    wt = _checks.check_ternary_weights("w", w)
    stride, dilation = _checks.check_conv(x.channels, wt.shape, stride, dilation, epilogue)
    cout = wt.shape[0]
    lo, hi, scale, bias = _checks.check_epilogue_args(epilogue, cout, lo, hi, scale, bias, np.int32)
    xs = _pad_same(unpack(x).astype(np.int64), wt.shape[2:], dilation)
    out_shape = conv_out_size(x.shape, stride)
    acc = np.zeros(out_shape + (cout,), np.int64)
    for (a, b, c), view in _taps(xs, wt.shape[2:], stride, dilation, out_shape):
        acc += view @ wt[:, :, a, b, c].astype(np.int64).T
    return _epilogue(acc, epilogue, lo, hi, scale, bias)


def _epilogue(acc, epilogue, lo, hi, scale, bias):
    cout = acc.shape[-1]
    if epilogue == "int32":
        return acc.astype(np.int32)
    if epilogue == "float":
        scale = np.ones(cout, np.float32) if scale is None else scale
        bias = np.zeros(cout, np.float32) if bias is None else bias
        return (scale * acc.astype(np.float32) + bias).astype(np.float32)
    return _planes_to_map(ternarize(acc, lo, hi))


def float_conv3d(x, w, bias=None, stride=1, dilation=1, epilogue="ternary", lo=None, hi=None,
                 threads=None):
    """Float weights (Cout, Cin, kd, kh, kw) x float32 input (D, H, W, Cin): y = acc + bias.

    Accumulates in float32 tap by tap, channel by channel (the kernel's order, so results are
    bit-identical); 'ternary' packs y with (lo, hi), 'float' returns y (D, H, W, Cout).
    """
    _checks.check_array("x", x, np.float32, ndim=4)
    _checks.check_array("w", w, np.float32, ndim=5)
    _checks.check_kernel_size("w", w.shape[2:])
    if epilogue not in ("ternary", "float"):
        raise ValueError(f"float_conv3d epilogue must be 'ternary' or 'float', got {epilogue!r}")
    stride, dilation = _checks.check_conv(x.shape[3], w.shape, stride, dilation, epilogue)
    cout = w.shape[0]
    bias = np.zeros(cout, np.float32) if bias is None else _checks.check_channel_vector(
        "bias", bias, cout, np.float32)
    lo, hi, _, _ = _checks.check_epilogue_args(epilogue, cout, lo, hi, None, None, np.float32)
    xs = _pad_same(x, w.shape[2:], dilation)
    out_shape = conv_out_size(x.shape[:3], stride)
    acc = np.zeros(out_shape + (cout,), np.float32)
    for (a, b, c), view in _taps(xs, w.shape[2:], stride, dilation, out_shape):
        for ci in range(x.shape[3]):
            acc += view[..., ci:ci + 1] * w[:, ci, a, b, c]
    y = acc + bias
    return y if epilogue == "float" else _planes_to_map(ternarize(y, lo, hi))


def max_pool(m, threads=None):
    """2x2x2 ternary max pool, stride 2, output ceil(n / 2) (windows clipped at the far border)."""
    _checks.check_map("m", m)
    q = unpack(m)
    d, h, w = m.shape
    padded = np.full((d + d % 2, h + h % 2, w + w % 2, m.channels), -2, np.int8)
    padded[:d, :h, :w] = q
    od, oh, ow = padded.shape[0] // 2, padded.shape[1] // 2, padded.shape[2] // 2
    pooled = padded.reshape(od, 2, oh, 2, ow, 2, m.channels).max(axis=(1, 3, 5))
    return _planes_to_map(pooled)


def upsample(m, out_shape=None, threads=None):
    """Nearest-neighbour x2 upsampling to out_shape (default 2x; each axis 2n-1 or 2n)."""
    _checks.check_map("m", m)
    out_shape = _checks.check_upsample_shape(m.shape, out_shape)
    q = unpack(m)
    for axis in range(3):
        q = np.repeat(q, 2, axis=axis)
    return _planes_to_map(np.ascontiguousarray(q[:out_shape[0], :out_shape[1], :out_shape[2]]))


def concat(a, b, threads=None):
    """Channel concatenation [a | b] of two maps of the same spatial shape."""
    _checks.check_map("a", a)
    _checks.check_map("b", b)
    if a.shape != b.shape:
        raise ValueError(f"concat needs equal spatial shapes, got a {a.shape} and b {b.shape}")
    return _planes_to_map(np.concatenate([unpack(a), unpack(b)], axis=-1))


CLASSIFIER_CHUNK_VOXELS = 1 << 18  # voxels per classifier chunk (C order: whole z slabs and rows)


def classifier_tables(weight):
    """(channel bytes, 65536, K) float32 per-byte partial sums of the float classifier ``weight``
    (K, C): entry [g][mask | sign << 8] = sum over the (up to 8) channels c of byte g of
    q_c * weight[:, c], q_c = +1, -1 or 0 from mask bit and sign bit, summed in channel order."""
    weight = np.asarray(weight, np.float32)
    code = np.arange(1 << 16)
    mask, sign = code & 0xFF, code >> 8
    tables = np.zeros((channel_bytes(weight.shape[1]), 1 << 16, weight.shape[0]), np.float32)
    for g, table in enumerate(tables):
        for bit, column in enumerate(weight[:, 8 * g:8 * g + 8].T):
            q = (((mask >> bit) & 1) * (1 - 2 * ((sign >> bit) & 1))).astype(np.float32)
            table += q[:, None] * column
    return tables


def classifier(x, weight, bias, tables=None, threads=None):
    """Float classifier on a ternary map: logits = unpack(x) @ weight.T + bias, float32 (D, H, W, K).

    Reads the packed map directly, one byte of channels at a time: the 8 mask bits and 8 sign bits
    of a voxel index that byte's table of partial sums (``classifier_tables``; computed here unless
    given), and the logits are bias + table_0 + table_1 + ... in that order. The rounding is fixed
    by the model alone (no BLAS, whose results depend on threads or alignment), so the kernels and
    the reference give identical logits. Chunks of voxels keep the memory bounded.
    """
    weight, bias, tables = _checks.check_classifier(x, weight, bias, tables)
    if tables is None:
        tables = classifier_tables(weight)
    records = x.data.reshape(-1, 2, x.data.shape[-1])  # (voxels, mask/sign, channel bytes)
    logits = np.empty((records.shape[0], weight.shape[0]), np.float32)
    logits[...] = bias
    chunk = CLASSIFIER_CHUNK_VOXELS
    for g, table in enumerate(tables):
        for start in range(0, records.shape[0], chunk):
            byte = records[start:start + chunk, :, g]
            code = byte[:, 0].astype(np.intp) | (byte[:, 1].astype(np.intp) << 8)
            logits[start:start + chunk] += np.take(table, code, axis=0)
    return logits.reshape(x.shape + (weight.shape[0],))


__all__ = ["pack", "unpack", "pack_weights", "ternary_conv3d", "float_conv3d", "max_pool",
           "upsample", "concat", "classifier", "classifier_tables", "ternarize", "PackedWeights",
           "TernaryMap"]
