"""The C kernels (TernarySegmentationLib.kernels) against the numpy oracle (reference), bit for bit,
on every dispatch path and thread count; and the oracle against torch (a second, independent
oracle).

Sweeps are composed lists of cases rather than cartesian products, so the file runs in well under
two minutes on 2 cores. Every random input comes from a numpy Generator seeded from the case itself.
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from TernarySegmentationLib import kernels as K
from TernarySegmentationLib import reference as R
from TernarySegmentationLib.packed import TernaryMap, channel_bytes, k_words

INT32_MIN = np.iinfo(np.int32).min
INT32_MAX = np.iinfo(np.int32).max
PATHS = K.available_paths()
CHANNELS = (1, 7, 8, 63, 64, 65, 130)
SPARSITIES = (0.0, 0.3, 0.7, 0.95)  # probability of a zero


# ------------------------------------------------------------------------------------ helpers

def rng_for(*key):
    """A Generator seeded from the test case, so every case is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def rand_ternary(rng, shape, channels, p_zero):
    """int8 (D, H, W, C) in {-1, 0, +1} with about p_zero zeros."""
    q = rng.choice(np.array([-1, 1], np.int8), size=tuple(shape) + (channels,))
    q[rng.random(q.shape) < p_zero] = 0
    return q


def to_map(q):
    """int8 ternary values -> TernaryMap, via the reference pack with thresholds -0.5 / 0.5."""
    c = q.shape[-1]
    return R.pack(np.ascontiguousarray(q, np.float32), np.full(c, -0.5, np.float32),
                  np.full(c, 0.5, np.float32))


def rand_map(rng, shape, channels, p_zero):
    q = rand_ternary(rng, shape, channels, p_zero)
    return q, to_map(q)


def rand_weights(rng, cout, cin, kernel, p_zero):
    w = rng.choice(np.array([-1, 1], np.int8), size=(cout, cin) + triple(kernel))
    w[rng.random(w.shape) < p_zero] = 0
    return w


def assert_map_equal(got, expected):
    assert isinstance(got, TernaryMap)
    assert got.channels == expected.channels
    assert got.shape == expected.shape
    assert got.is_canonical()
    if got != expected:
        diff = R.unpack(got) != R.unpack(expected)
        where = np.argwhere(diff)
        raise AssertionError(f"maps differ at {len(where)} of {diff.size} values, first "
                             f"(d, h, w, c) "
                             f"{where[:5].tolist()}: got {R.unpack(got)[diff][:5].tolist()}, "
                             f"expected {R.unpack(expected)[diff][:5].tolist()}")


def assert_array_equal(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (
        got.dtype, got.shape, expected.dtype, expected.shape)
    if not np.array_equal(got, expected):
        where = np.argwhere(got != expected)
        raise AssertionError(f"arrays differ at {len(where)} of {got.size} values, first "
                             f"{where[:5].tolist()}: got {got[tuple(where[:5].T)].tolist()}, "
                             f"expected {expected[tuple(where[:5].T)].tolist()}")


def case_id(case):
    if not isinstance(case, tuple):
        return None  # let pytest name it
    return "-".join(str(v).replace(" ", "") for v in case)


@pytest.fixture(params=PATHS)
def path(request):
    """Runs the test body on one instruction-set path (and checks use_path restores the old one)."""
    before = K.current_path()
    with K.use_path(request.param):
        assert K.current_path() == request.param
        yield request.param
    assert K.current_path() == before


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


# ------------------------------------------------------------------------------------ dispatch

def test_available_paths_and_selection():
    assert PATHS[0] == "portable"
    assert set(PATHS) <= set(K.PATHS)
    assert PATHS == [p for p in K.PATHS if p in PATHS]  # slowest first
    assert K.max_threads() >= 1
    before = K.current_path()
    try:
        assert K.set_path("auto") == PATHS[-1]
        assert K.current_path() == PATHS[-1]
        for name in PATHS:
            assert K.set_path(name) == name
            assert K.current_path() == name
    finally:
        K.set_path(before)
    assert K.current_path() == before


def test_use_path_restores_after_exception():
    before = K.current_path()
    with pytest.raises(KeyError):
        with K.use_path("portable"):
            assert K.current_path() == "portable"
            raise KeyError("boom")
    assert K.current_path() == before


# ------------------------------------------------------------------------------------ pack / unpack

PACK_CASES = [(c, shape, p) for c, shape, p in zip(
    CHANNELS,
    [(1, 1, 1), (3, 1, 5), (1, 7, 1), (7, 5, 9), (3, 3, 3), (5, 1, 3), (3, 5, 1)],
    [0.5, 0.0, 0.9, 0.3, 0.7, 0.5, 0.95])]


@pytest.mark.parametrize("case", PACK_CASES, ids=case_id)
def test_pack_unpack(case):
    channels, shape, _ = case
    rng = rng_for("pack", case)
    x = rng.standard_normal(tuple(shape) + (channels,)).astype(np.float32)
    lo = rng.uniform(-1.0, 0.2, channels).astype(np.float32)
    hi = rng.uniform(-0.2, 1.0, channels).astype(np.float32)  # lo > hi in some channels
    # values exactly on the thresholds map to 0 (strict comparisons)
    x.reshape(-1, channels)[0] = hi
    x.reshape(-1, channels)[-1] = lo
    expected_q = np.where(x > hi, 1, np.where(x < lo, -1, 0)).astype(np.int8)

    ref = R.pack(x, lo, hi)
    assert ref.is_canonical()
    assert_array_equal(R.unpack(ref), expected_q)
    results = [K.pack(x, lo, hi, threads=t) for t in (1, 2, None)]
    for got in results:
        assert_map_equal(got, ref)
        for t in (1, 2):
            assert_array_equal(K.unpack(got, threads=t), expected_q)
    assert results[0].data.shape == tuple(shape) + (2, channel_bytes(channels))


@pytest.mark.parametrize("channels", CHANNELS)
def test_unpack_random_maps(channels):
    rng = rng_for("unpack", channels)
    for shape, p in (((1, 1, 1), 0.0), ((5, 3, 7), 0.5), ((3, 1, 9), 0.95)):
        q, m = rand_map(rng, shape, channels, p)
        assert m.is_canonical()
        assert_array_equal(R.unpack(m), q)
        assert_array_equal(K.unpack(m, threads=1), q)
        assert_array_equal(K.unpack(m, threads=2), q)
        # pack of the unpacked values gives the map back
        c = channels
        back = K.pack(q.astype(np.float32), np.full(c, -0.5, np.float32),
                      np.full(c, 0.5, np.float32))
        assert_map_equal(back, m)


def test_pack_bit_layout():
    """Channel c sits at byte c // 8, bit c % 8 of the mask (nonzero) and sign (= -1) planes."""
    q = np.zeros((1, 1, 2, 10), np.int8)
    q[0, 0, 0, 9] = -1
    q[0, 0, 0, 0] = 1
    q[0, 0, 1, 3] = -1
    c = 10
    m = K.pack(q.astype(np.float32), np.full(c, -0.5, np.float32), np.full(c, 0.5, np.float32))
    assert m.data.shape == (1, 1, 2, 2, 2)
    assert m.data[0, 0, 0].tolist() == [[0b00000001, 0b10], [0b00000000, 0b10]]
    assert m.data[0, 0, 1].tolist() == [[0b00001000, 0], [0b00001000, 0]]
    assert m == to_map(q)


@pytest.mark.parametrize("channels", (1, 9, 64, 130))
def test_pack_nan_is_zero(channels):
    rng = rng_for("nan", channels)
    x = rng.standard_normal((3, 5, 7, channels)).astype(np.float32) * 3
    x[rng.random(x.shape) < 0.4] = np.nan
    x[0, 0, 0, :] = np.nan
    lo = np.full(channels, -0.5, np.float32)
    hi = np.full(channels, 0.5, np.float32)
    for t in (1, 2):
        got = K.pack(x, lo, hi, threads=t)
        assert got.is_canonical()
        q = K.unpack(got)
        assert np.all(q[np.isnan(x)] == 0)
        assert np.all(q[0, 0, 0] == 0)
        assert_array_equal(q, np.where(x > hi, 1, np.where(x < lo, -1, 0)).astype(np.int8))
        assert_map_equal(got, R.pack(x, lo, hi))


# ------------------------------------------------------------------------------------ pack_weights

WEIGHT_CASES = [
    (1, 1, (1, 1, 1)), (7, 1, (3, 3, 3)), (8, 7, (1, 3, 3)), (9, 8, (3, 1, 1)),
    (63, 64, (3, 3, 3)), (64, 63, (1, 1, 1)), (65, 65, (3, 3, 3)), (130, 130, (1, 1, 1)),
    (1, 130, (3, 3, 3)), (24, 9, (1, 3, 5)), (16, 64, (1, 3, 5)),
]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=case_id)
def test_pack_weights(case):
    cout, cin, kernel = case
    rng = rng_for("weights", case)
    w = rand_weights(rng, cout, cin, kernel, 0.4)
    got, ref = K.pack_weights(w), R.pack_weights(w)
    shape = (-(-cout // 8), k_words(cin, kernel), 2, 8)
    assert got.words.dtype == np.uint64 and got.words.shape == shape
    assert_array_equal(got.words, ref.words)
    assert_array_equal(got.ternary, w)
    assert got.out_channels == cout and got.in_channels == cin and got.kernel_size == kernel


@pytest.mark.parametrize("f,c,tap,value", [(0, 0, 0, 1), (9, 12, 4, -1), (65, 129, 26, -1),
                                           (7, 64, 13, 1)])
def test_pack_weights_bit_layout(f, c, tap, value):
    """One nonzero weight sets one bit where packed.PackedWeights documents it."""
    cout, cin, kernel = 66, 130, (3, 3, 3)
    w = np.zeros((cout, cin) + kernel, np.int8)
    w[f, c].reshape(-1)[tap] = value
    words = K.pack_weights(w).words
    cb = channel_bytes(cin)
    byte = tap * cb + c // 8
    word, bit = byte // 8, (byte % 8) * 8 + c % 8
    expected = np.zeros_like(words)
    expected[f // 8, word, 0, f % 8] = np.uint64(1) << np.uint64(bit)
    if value < 0:
        expected[f // 8, word, 1, f % 8] = np.uint64(1) << np.uint64(bit)
    assert_array_equal(words, expected)
    assert_array_equal(R.pack_weights(w).words, expected)


# ------------------------------------------------------------------------------------ ternary conv

# (cin, cout, input shape, kernel, stride, dilation, sparsity of x, sparsity of w)
CONV_CASES = [
    (1, 1, (1, 1, 1), (1, 1, 1), 1, 1, 0.0, 0.0),
    (1, 7, (3, 3, 3), (3, 3, 3), 1, 1, 0.3, 0.3),
    (7, 1, (5, 3, 1), (3, 3, 3), 1, 1, 0.0, 0.7),
    (7, 8, (1, 5, 7), (1, 3, 3), 1, 1, 0.7, 0.3),
    (8, 7, (7, 5, 9), (3, 1, 1), 1, 1, 0.3, 0.0),
    (8, 9, (7, 5, 9), (3, 3, 3), 2, 1, 0.95, 0.3),
    (63, 64, (3, 5, 7), (3, 3, 3), 1, 2, 0.3, 0.7),
    (64, 63, (5, 1, 7), (3, 3, 3), (1, 2, 2), 1, 0.0, 0.3),
    (64, 65, (5, 5, 5), (1, 1, 1), 2, 1, 0.7, 0.0),
    (65, 64, (3, 7, 5), (1, 3, 3), 1, 3, 0.3, 0.95),
    (65, 130, (3, 3, 5), (3, 3, 3), 1, 1, 0.7, 0.7),
    (130, 65, (5, 3, 3), (3, 3, 3), (2, 1, 2), (1, 2, 1), 0.3, 0.3),
    (130, 130, (3, 5, 3), (3, 1, 1), 1, 3, 0.0, 0.3),
    (130, 1, (3, 3, 3), (3, 3, 3), 1, 1, 0.3, 0.0),
    (64, 16, (3, 3, 5), (1, 3, 5), 1, 1, 0.3, 0.3),          # exactly 15 weight words per filter
    (72, 24, (3, 5, 3), (5, 1, 3), 2, (1, 1, 2), 0.3, 0.3),  # 17 words, 3 octets
    (9, 40, (1, 3, 133), (1, 1, 3), 1, 1, 0.5, 0.3),         # several voxel blocks along W
    (3, 32, (2, 2, 261), (1, 1, 3), (1, 1, 2), 1, 0.5, 0.3),  # even input sizes, 131 outputs
    (5, 9, (7, 5, 9), (3, 3, 3), 3, 2, 0.3, 0.3),
    (1, 130, (1, 1, 1), (3, 3, 3), 2, 3, 0.0, 0.0),         # kernel wider than the input
    (63, 8, (1, 1, 7), (1, 1, 3), (1, 1, 3), (1, 1, 3), 0.3, 0.3),
    # the gather's fixed-size record copies: 3, 4, 6, 12 and 24 channel bytes
    (24, 8, (3, 4, 9), (3, 3, 3), 1, 1, 0.3, 0.3),
    (32, 16, (3, 4, 11), (3, 3, 3), 1, 1, 0.3, 0.3),
    (48, 16, (3, 3, 7), (3, 3, 3), 1, 2, 0.3, 0.5),
    (96, 16, (3, 4, 6), (3, 3, 3), 1, 1, 0.5, 0.3),
    (192, 9, (2, 3, 5), (3, 3, 3), (1, 1, 2), 1, 0.3, 0.3),
]

_conv_cache = {}


def conv_case(case):
    """Inputs and reference outputs of a conv case (computed once, shared by every path)."""
    if case not in _conv_cache:
        cin, cout, shape, kernel, stride, dilation, px, pw = case
        rng = rng_for("conv", case)
        q, x = rand_map(rng, shape, cin, px)
        w = rand_weights(rng, cout, cin, kernel, pw)
        s = max(1, int(np.sqrt(np.prod(kernel) * cin * (1 - px) * (1 - pw)) / 2))
        lo = rng.integers(-s, s + 1, cout).astype(np.int32)
        hi = (lo + rng.integers(-1, s + 1, cout)).astype(np.int32)  # lo > hi in some channels
        scale = rng.uniform(-2, 2, cout).astype(np.float32)
        bias = rng.uniform(-3, 3, cout).astype(np.float32)
        kw = dict(stride=stride, dilation=dilation)
        ref = {
            "int32": R.ternary_conv3d(x, w, epilogue="int32", **kw),
            "ternary": R.ternary_conv3d(x, w, epilogue="ternary", lo=lo, hi=hi, **kw),
            "float": R.ternary_conv3d(x, w, epilogue="float", scale=scale, bias=bias, **kw),
        }
        _conv_cache[case] = dict(q=q, x=x, w=w, lo=lo, hi=hi, scale=scale, bias=bias, kw=kw,
                                 ref=ref)
    return _conv_cache[case]


def expected_out_shape(shape, stride):
    return tuple(-(-n // s) for n, s in zip(shape, triple(stride)))


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_ternary_conv3d(path, case):
    c = conv_case(case)
    x, w, kw, ref = c["x"], c["w"], c["kw"], c["ref"]
    out_shape = expected_out_shape(x.shape, kw["stride"])
    assert ref["int32"].shape == out_shape + (w.shape[0],)
    packed = K.pack_weights(w)
    for threads, weights in ((1, w), (2, packed), (None, packed)):
        got = K.ternary_conv3d(x, weights, epilogue="int32", threads=threads, **kw)
        assert_array_equal(got, ref["int32"])
        got = K.ternary_conv3d(x, weights, epilogue="ternary", lo=c["lo"], hi=c["hi"],
                               threads=threads, **kw)
        assert_map_equal(got, ref["ternary"])
        got = K.ternary_conv3d(x, weights, epilogue="float", scale=c["scale"], bias=c["bias"],
                               threads=threads, **kw)
        assert_array_equal(got, ref["float"])


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_reference_ternary_conv_matches_torch(torch, case):
    cin, cout, shape, kernel, stride, dilation = case[:6]
    c = conv_case(case)
    dil = triple(dilation)
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil))
    xt = torch.from_numpy(np.moveaxis(c["q"], -1, 0)[None].astype(np.float64))
    wt = torch.from_numpy(c["w"].astype(np.float64))
    yt = torch.nn.functional.conv3d(xt, wt, stride=triple(stride), padding=padding, dilation=dil)
    expected = np.moveaxis(yt[0].numpy(), 0, -1)
    assert_array_equal(expected.astype(np.int64).astype(np.float64), expected)  # integral
    assert_array_equal(c["ref"]["int32"], expected.astype(np.int32))
    # the default float epilogue (scale 1, bias 0) is the accumulator as float32
    assert_array_equal(R.ternary_conv3d(c["x"], c["w"], epilogue="float", **c["kw"]),
                       expected.astype(np.float32))


@pytest.mark.parametrize("case", [(65, 130, (3, 5, 3), (3, 3, 3)), (7, 9, (1, 3, 5), (1, 3, 3)),
                                  (1, 8, (5, 1, 1), (3, 1, 1))], ids=case_id)
def test_ternary_conv3d_constant_thresholds(path, case):
    """hi = INT32_MIN -> +1 everywhere (even with lo = INT32_MAX); lo = hi = INT32_MAX -> -1;
    lo = INT32_MIN, hi = INT32_MAX -> 0."""
    cin, cout, shape, kernel = case
    rng = rng_for("const", case)
    _, x = rand_map(rng, shape, cin, 0.3)
    w = rand_weights(rng, cout, cin, kernel, 0.3)
    kind = np.arange(cout) % 4
    lo = np.choose(kind, [INT32_MIN, INT32_MAX, INT32_MIN, INT32_MAX]).astype(np.int32)
    hi = np.choose(kind, [INT32_MIN, INT32_MAX, INT32_MAX, INT32_MIN]).astype(np.int32)
    value = np.choose(kind, [1, -1, 0, 1]).astype(np.int8)
    expected = to_map(np.broadcast_to(value, tuple(shape) + (cout,)))
    assert_map_equal(R.ternary_conv3d(x, w, lo=lo, hi=hi), expected)
    for threads in (1, 2):
        assert_map_equal(K.ternary_conv3d(x, w, lo=lo, hi=hi, threads=threads), expected)
    # all +1, all -1, all 0 over every channel
    for lo_v, hi_v, v in ((0, INT32_MIN, 1), (INT32_MAX, INT32_MAX, -1), (INT32_MIN, INT32_MAX, 0)):
        lo = np.full(cout, lo_v, np.int32)
        hi = np.full(cout, hi_v, np.int32)
        expected = to_map(np.full(tuple(shape) + (cout,), v, np.int8))
        assert_map_equal(K.ternary_conv3d(x, w, lo=lo, hi=hi, threads=2), expected)


# 72 and 80 input channels with 3x3x3 give 31 and 34 words: around the AVX2 byte-sum flush (31)
@pytest.mark.parametrize("cin,kernel", [(130, (3, 3, 3)), (64, (3, 3, 3)), (65, (1, 3, 5)),
                                        (8, (1, 1, 1)), (72, (3, 3, 3)), (80, (3, 3, 3))])
def test_ternary_conv3d_saturated_accumulators(path, cin, kernel):
    """All-ones inputs: interior accumulators reach +-taps*Cin exactly (no narrow-sum overflow)."""
    shape = (3, 3, 5)  # voxel (1, 1, 2) sees every tap of each kernel below
    q = np.ones(shape + (cin,), np.int8)
    q[..., 1::2] = -1
    x = to_map(q)
    cout = 16
    pattern = np.where(np.arange(cin) % 2 == 1, -1, 1).astype(np.int8)  # matches the input signs
    w = np.broadcast_to(pattern[None, :, None, None, None], (cout, cin) + kernel).copy()
    w[8:] *= -1
    taps = int(np.prod(kernel))
    got = K.ternary_conv3d(x, w, epilogue="int32")
    ref = R.ternary_conv3d(x, w, epilogue="int32")
    assert_array_equal(got, ref)
    assert np.all(got[1, 1, 2, :8] == taps * cin)
    assert np.all(got[1, 1, 2, 8:] == -taps * cin)


# a larger random case on every path
BIG_SHAPE, BIG_C = (17, 19, 23), 64


@pytest.fixture(scope="module")
def big_case():
    rng = rng_for("big")
    _, x = rand_map(rng, BIG_SHAPE, BIG_C, 0.4)
    w = rand_weights(rng, BIG_C, BIG_C, (3, 3, 3), 0.5)
    lo = rng.integers(-12, 4, BIG_C).astype(np.int32)
    hi = (lo + rng.integers(0, 16, BIG_C)).astype(np.int32)
    acc = R.ternary_conv3d(x, w, epilogue="int32")
    ternary = R.ternary_conv3d(x, w, lo=lo, hi=hi)
    # the ternary epilogue is the thresholded accumulator (a cheap consistency check of the oracle)
    assert_array_equal(R.unpack(ternary),
                       np.where(acc > hi, 1, np.where(acc < lo, -1, 0)).astype(np.int8))
    return dict(x=x, w=K.pack_weights(w), lo=lo, hi=hi, acc=acc, ternary=ternary)


def test_ternary_conv3d_large(path, big_case):
    c = big_case
    assert len(np.unique(R.unpack(c["ternary"]))) == 3
    for threads in (1, 2):
        assert_array_equal(K.ternary_conv3d(c["x"], c["w"], epilogue="int32", threads=threads),
                           c["acc"])
        assert_map_equal(K.ternary_conv3d(c["x"], c["w"], lo=c["lo"], hi=c["hi"], threads=threads),
                         c["ternary"])


def test_ternary_conv3d_large_strided_dilated(path, big_case):
    c = big_case
    kw = dict(stride=(1, 2, 2), dilation=(2, 1, 3), epilogue="int32")
    if "strided" not in c:
        c["strided"] = R.ternary_conv3d(c["x"], c["w"], **kw)
    assert c["strided"].shape == (17, 10, 12, BIG_C)
    assert_array_equal(K.ternary_conv3d(c["x"], c["w"], threads=2, **kw), c["strided"])


def _random_conv_cases(n):
    """Seeded random geometries (odd kernels 1..5, strides and dilations 1..3, sizes 1..9)."""
    rng = np.random.default_rng(20240601)
    cases = []
    while len(cases) < n:
        cin = int(rng.choice(CHANNELS + (2, 16, 17, 33, 100)))
        cout = int(rng.choice(CHANNELS + (2, 16, 24, 32, 40)))
        kernel = tuple(int(k) for k in rng.choice([1, 3, 5], 3))
        shape = tuple(int(v) for v in rng.integers(1, 10, 3))
        stride = tuple(int(v) for v in rng.integers(1, 4, 3))
        dilation = tuple(int(v) for v in rng.integers(1, 4, 3))
        if np.prod(shape) * np.prod(kernel) * cin * cout > 4e6:
            continue
        cases.append((cin, cout, shape, kernel, stride, dilation, float(rng.choice(SPARSITIES)),
                      float(rng.choice(SPARSITIES[:3]))))
    return cases


RANDOM_CONV_CASES = _random_conv_cases(24)


@pytest.mark.parametrize("case", RANDOM_CONV_CASES, ids=case_id)
def test_ternary_conv3d_random_geometry(path, case):
    c = conv_case(case)
    for threads in (1, 2):
        assert_array_equal(K.ternary_conv3d(c["x"], c["w"], epilogue="int32", threads=threads,
                                            **c["kw"]), c["ref"]["int32"])
        assert_map_equal(K.ternary_conv3d(c["x"], c["w"], lo=c["lo"], hi=c["hi"], threads=threads,
                                          **c["kw"]), c["ref"]["ternary"])


def test_ternary_conv3d_accepts_reference_packed_weights(path):
    """PackedWeights from the reference drive the C kernel (the layouts are one and the same)."""
    c = conv_case(CONV_CASES[11])
    got = K.ternary_conv3d(c["x"], R.pack_weights(c["w"]), epilogue="int32", **c["kw"])
    assert_array_equal(got, c["ref"]["int32"])


# ------------------------------------------------------------------------------------ float conv

# (cin, cout, input shape, kernel, stride, dilation)
FLOAT_CASES = [
    (1, 1, (1, 1, 1), (1, 1, 1), 1, 1),
    (1, 8, (7, 5, 9), (3, 3, 3), 1, 1),
    (1, 7, (5, 1, 7), (3, 3, 3), 2, 1),
    (2, 9, (5, 5, 5), (1, 3, 3), (1, 2, 2), 2),
    (7, 16, (3, 5, 7), (3, 1, 1), 1, 3),
    (3, 65, (3, 3, 3), (3, 3, 3), 2, (1, 2, 3)),
    (1, 130, (3, 5, 3), (3, 3, 3), 1, 1),
    (8, 64, (4, 6, 5), (5, 3, 1), 1, 1),
    (1, 63, (1, 1, 9), (1, 1, 3), (1, 1, 2), (1, 1, 3)),
    # rows wide enough for the four-voxel interior path (cout <= 16), with tails and strides
    (1, 16, (4, 5, 13), (3, 3, 3), 1, 1),
    (1, 16, (3, 4, 23), (3, 3, 3), (1, 1, 2), (1, 1, 2)),
    (2, 12, (3, 4, 11), (3, 3, 3), 1, 1),
    (1, 8, (3, 3, 10), (1, 3, 5), 1, (1, 1, 2)),
]

_float_cache = {}


def float_case(case):
    if case not in _float_cache:
        cin, cout, shape, kernel, stride, dilation = case
        rng = rng_for("float", case)
        x = (rng.standard_normal(tuple(shape) + (cin,)) * 100 + 20).astype(np.float32)
        w = (rng.standard_normal((cout, cin) + kernel) * 0.05).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32)
        kw = dict(stride=stride, dilation=dilation)
        y = R.float_conv3d(x, w, bias, epilogue="float", **kw)
        spread = float(np.std(y)) + 1e-3
        lo = rng.uniform(-1.0, 0.3, cout).astype(np.float32) * spread
        hi = rng.uniform(-0.3, 1.0, cout).astype(np.float32) * spread
        ternary = R.float_conv3d(x, w, bias, epilogue="ternary", lo=lo, hi=hi, **kw)
        _float_cache[case] = dict(x=x, w=w, bias=bias, lo=lo, hi=hi, kw=kw, y=y, ternary=ternary)
    return _float_cache[case]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=case_id)
def test_float_conv3d(path, case):
    c = float_case(case)
    x, w, bias, kw = c["x"], c["w"], c["bias"], c["kw"]
    assert c["y"].shape == expected_out_shape(x.shape[:3], kw["stride"]) + (w.shape[0],)
    for threads in (1, 2):
        got = K.float_conv3d(x, w, bias, epilogue="float", threads=threads, **kw)
        assert_array_equal(got, c["y"])
        got = K.float_conv3d(x, w, bias, epilogue="ternary", lo=c["lo"], hi=c["hi"],
                             threads=threads, **kw)
        assert_map_equal(got, c["ternary"])
    # bias defaults to zeros
    assert_array_equal(K.float_conv3d(x, w, epilogue="float", threads=2, **kw),
                       R.float_conv3d(x, w, epilogue="float", **kw))


@pytest.mark.parametrize("case", FLOAT_CASES, ids=case_id)
def test_reference_float_conv_matches_torch(torch, case):
    cin, cout, shape, kernel, stride, dilation = case
    c = float_case(case)
    dil = triple(dilation)
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil))
    xt = torch.from_numpy(np.moveaxis(c["x"], -1, 0)[None].astype(np.float64))
    yt = torch.nn.functional.conv3d(xt, torch.from_numpy(c["w"].astype(np.float64)),
                                    torch.from_numpy(c["bias"].astype(np.float64)),
                                    stride=triple(stride), padding=padding, dilation=dil)
    expected = np.moveaxis(yt[0].numpy(), 0, -1)
    assert c["y"].shape == expected.shape
    np.testing.assert_allclose(c["y"], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _random_float_cases(n):
    rng = np.random.default_rng(20240602)
    cases = []
    for _ in range(n):
        cases.append((int(rng.integers(1, 5)),
                      int(rng.choice([1, 7, 8, 9, 16, 31, 33, 40, 64, 65])),
                      tuple(int(v) for v in rng.integers(1, 8, 3)),
                      tuple(int(k) for k in rng.choice([1, 3, 5], 3)),
                      tuple(int(v) for v in rng.integers(1, 4, 3)),
                      tuple(int(v) for v in rng.integers(1, 4, 3))))
    return cases


@pytest.mark.parametrize("case", _random_float_cases(12), ids=case_id)
def test_float_conv3d_random_geometry(path, case):
    c = float_case(case)
    got = K.float_conv3d(c["x"], c["w"], c["bias"], epilogue="float", threads=2, **c["kw"])
    assert_array_equal(got, c["y"])
    got = K.float_conv3d(c["x"], c["w"], c["bias"], lo=c["lo"], hi=c["hi"], threads=1, **c["kw"])
    assert_map_equal(got, c["ternary"])


@pytest.mark.parametrize("channels", (1, 8, 9))
def test_float_conv3d_nan_input_packs_to_zero(path, channels):
    """NaN voxels make NaN sums, which the ternary epilogue maps to 0 (as pack does)."""
    rng = rng_for("float-nan", channels)
    x = rng.standard_normal((3, 5, 7, 1)).astype(np.float32)
    x[1, 2, 3] = np.nan
    w = rng.standard_normal((channels, 1, 1, 1, 1)).astype(np.float32)
    lo = np.full(channels, -0.1, np.float32)
    hi = np.full(channels, 0.1, np.float32)
    got = K.float_conv3d(x, w, lo=lo, hi=hi)
    assert_map_equal(got, R.float_conv3d(x, w, lo=lo, hi=hi))
    assert np.all(K.unpack(got)[1, 2, 3] == 0)
    assert np.any(K.unpack(got) != 0)


# ------------------------------------------------------------------------------------ map ops

POOL_CASES = [(1, (1, 1, 1)), (7, (3, 5, 7)), (8, (2, 4, 6)), (63, (5, 1, 3)), (64, (1, 7, 2)),
              (65, (7, 5, 9)), (130, (3, 3, 1))]


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_max_pool(torch, case):
    channels, shape = case
    rng = rng_for("pool", case)
    for p in (0.0, 0.5, 0.9):
        q, m = rand_map(rng, shape, channels, p)
        q[..., 0] = -1  # an all -1 channel pools to -1
        m = to_map(q)
        ref = R.max_pool(m)
        assert ref.shape == tuple(-(-n // 2) for n in shape)
        for t in (1, 2):
            assert_map_equal(K.max_pool(m, threads=t), ref)
        qt = torch.from_numpy(np.moveaxis(q, -1, 0)[None].astype(np.float32))
        pooled = torch.nn.functional.max_pool3d(qt, 2, 2, ceil_mode=True)
        assert_array_equal(R.unpack(ref), np.moveaxis(pooled[0].numpy(), 0, -1).astype(np.int8))


UPSAMPLE_CASES = [(1, (1, 1, 1), None), (7, (3, 5, 7), None), (8, (3, 5, 7), (5, 9, 13)),
                  (63, (1, 2, 3), (1, 4, 5)), (64, (2, 1, 4), (3, 2, 7)), (65, (3, 3, 3), None),
                  (130, (2, 3, 1), (4, 5, 1)), (16, (3, 4, 5), None), (32, (2, 3, 4), (3, 6, 8))]


@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=case_id)
def test_upsample(case):
    channels, shape, out_shape = case
    rng = rng_for("upsample", case)
    q, m = rand_map(rng, shape, channels, 0.4)
    ref = R.upsample(m, out_shape)
    expected_shape = tuple(2 * n for n in shape) if out_shape is None else out_shape
    assert ref.shape == expected_shape
    z, y, x = np.meshgrid(*(np.arange(n) // 2 for n in expected_shape), indexing="ij")
    assert_array_equal(R.unpack(ref), q[z, y, x])
    for t in (1, 2):
        assert_map_equal(K.upsample(m, out_shape, threads=t), ref)


CONCAT_SPLITS = [(7, 9), (63, 65), (64, 1), (1, 130), (8, 8), (130, 7), (1, 1), (65, 64), (3, 63),
                 (16, 16), (32, 64), (128, 16), (24, 40)]   # byte-aligned: record sizes 1, 2, 4, 8, 16, 3, 5


@pytest.mark.parametrize("split", CONCAT_SPLITS, ids=case_id)
def test_concat(split):
    ca, cb = split
    rng = rng_for("concat", split)
    shape = (3, 1, 5) if ca + cb > 64 else (5, 3, 7)
    qa, a = rand_map(rng, shape, ca, 0.3)
    qb, b = rand_map(rng, shape, cb, 0.6)
    ref = R.concat(a, b)
    assert ref.channels == ca + cb
    assert_array_equal(R.unpack(ref), np.concatenate([qa, qb], axis=-1))
    for t in (1, 2):
        assert_map_equal(K.concat(a, b, threads=t), ref)


@pytest.mark.parametrize("channels, classes, shape", [(1, 2, (1, 1, 1)), (8, 2, (5, 3, 7)), (9, 3, (2, 7, 3)),
                                                     (16, 2, (4, 6, 5)), (65, 5, (3, 1, 5)), (130, 1, (2, 2, 2))])
def test_classifier(channels, classes, shape):
    """The C classifier adds the same float32 table entries in the same order as the reference."""
    rng = rng_for("classifier", channels, classes)
    q, m = rand_map(rng, shape, channels, 0.5)
    w = rng.normal(0, 1, (classes, channels)).astype(np.float32)
    bias = rng.normal(0, 1, classes).astype(np.float32)
    ref = R.classifier(m, w, bias)
    np.testing.assert_allclose(ref, q.astype(np.float64) @ w.T.astype(np.float64) + bias, rtol=1e-5,
                               atol=1e-5 * np.sqrt(channels))
    tables = R.classifier_tables(w)
    for t in (1, 2):
        assert_array_equal(K.classifier(m, w, bias, threads=t), ref)
        assert_array_equal(K.classifier(m, w, bias, tables=tables, threads=t), ref)


def test_map_ops_every_path(path):
    """The memory-bound ops are shared by all paths; they still run and agree on each."""
    rng = rng_for("maps", path)
    q, m = rand_map(rng, (5, 3, 7), 65, 0.4)
    _, m2 = rand_map(rng, (5, 3, 7), 9, 0.4)
    assert_array_equal(K.unpack(m), q)
    assert_map_equal(K.max_pool(m), R.max_pool(m))
    assert_map_equal(K.upsample(m, (9, 6, 13)), R.upsample(m, (9, 6, 13)))
    assert_map_equal(K.concat(m, m2), R.concat(m, m2))
    w = rng.normal(0, 1, (2, 65)).astype(np.float32)
    assert_array_equal(K.classifier(m, w, np.ones(2, np.float32)), R.classifier(m, w, np.ones(2, np.float32)))


# ------------------------------------------------------------------------------------ bad arguments

def _bad_calls():
    rng = rng_for("bad")
    x32 = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
    lo = np.full(8, -0.5, np.float32)
    hi = np.full(8, 0.5, np.float32)
    _, m = rand_map(rng, (3, 3, 3), 8, 0.3)
    _, m7 = rand_map(rng, (3, 3, 3), 7, 0.3)
    _, m_other = rand_map(rng, (3, 3, 5), 8, 0.3)
    w = rand_weights(rng, 4, 8, (3, 3, 3), 0.3)
    ilo = np.full(4, -1, np.int32)
    ihi = np.full(4, 1, np.int32)
    wf = rng.standard_normal((4, 8, 3, 3, 3)).astype(np.float32)
    return {
        "pack float64 x": (lambda mod: mod.pack(x32.astype(np.float64), lo, hi), r"\bx\b.*float32"),
        "pack non-contiguous x": (lambda mod: mod.pack(np.asfortranarray(x32), lo, hi),
                                  r"\bx\b.*contiguous"),
        "pack strided x": (lambda mod: mod.pack(x32[:, :, ::2], lo, hi), r"\bx\b.*contiguous"),
        "pack short lo": (lambda mod: mod.pack(x32, lo[:7], hi), r"\blo\b.*shape"),
        "pack float64 hi": (lambda mod: mod.pack(x32, lo, hi.astype(np.float64)), r"\bhi\b"),
        "unpack not a map": (lambda mod: mod.unpack(x32), r"\bm\b.*TernaryMap"),
        "conv short lo": (lambda mod: mod.ternary_conv3d(m, w, lo=ilo[:3], hi=ihi), r"\blo\b"),
        "conv long hi": (lambda mod: mod.ternary_conv3d(m, w, lo=ilo, hi=np.full(5, 1, np.int32)),
                         r"\bhi\b"),
        "conv float lo": (lambda mod: mod.ternary_conv3d(m, w, lo=ilo.astype(np.float32), hi=ihi),
                          r"\blo\b.*int32"),
        "conv missing thresholds": (lambda mod: mod.ternary_conv3d(m, w), r"\blo\b.*\bhi\b"),
        "conv short scale": (lambda mod: mod.ternary_conv3d(m, w, epilogue="float",
                                                            scale=np.ones(3, np.float32)),
                             r"\bscale\b"),
        "conv even kernel": (lambda mod: mod.ternary_conv3d(
            m, np.zeros((4, 8, 3, 2, 3), np.int8), lo=ilo, hi=ihi), r"\bw\b.*odd"),
        "pack_weights even kernel": (
            lambda mod: mod.pack_weights(np.zeros((4, 8, 2, 3, 3), np.int8)), r"\bw\b.*odd"),
        "conv stride 0": (lambda mod: mod.ternary_conv3d(m, w, stride=0, lo=ilo, hi=ihi),
                          r"\bstride\b"),
        "conv stride (1,0,1)": (lambda mod: mod.ternary_conv3d(m, w, stride=(1, 0, 1), lo=ilo,
                                                               hi=ihi), r"\bstride\b"),
        "conv dilation 0": (lambda mod: mod.ternary_conv3d(m, w, dilation=0, lo=ilo, hi=ihi),
                            r"\bdilation\b"),
        "conv channel mismatch": (lambda mod: mod.ternary_conv3d(m7, w, lo=ilo, hi=ihi),
                                  r"input channels.*\bx\b"),
        "conv weight value 2": (lambda mod: mod.ternary_conv3d(m, np.where(w == 1, 2, w).astype(
            np.int8), lo=ilo, hi=ihi), r"\bw\b.*values"),
        "pack_weights value -2": (
            lambda mod: mod.pack_weights(np.full((1, 1, 1, 1, 1), -2, np.int8)), r"\bw\b.*values"),
        "pack_weights int16": (lambda mod: mod.pack_weights(w.astype(np.int16)), r"\bw\b.*int8"),
        "conv bad epilogue": (lambda mod: mod.ternary_conv3d(m, w, epilogue="relu"), r"epilogue"),
        "conv x not a map": (lambda mod: mod.ternary_conv3d(x32, w, lo=ilo, hi=ihi), r"\bx\b"),
        "float conv float64 x": (lambda mod: mod.float_conv3d(x32.astype(np.float64), wf,
                                                              epilogue="float"), r"\bx\b.*float32"),
        "float conv non-contiguous w": (lambda mod: mod.float_conv3d(
            x32, np.asfortranarray(wf), epilogue="float"), r"\bw\b.*contiguous"),
        "float conv even kernel": (lambda mod: mod.float_conv3d(
            x32, np.zeros((4, 8, 3, 3, 4), np.float32), epilogue="float"), r"\bw\b.*odd"),
        "float conv channel mismatch": (lambda mod: mod.float_conv3d(x32[..., :7].copy(), wf,
                                                                     epilogue="float"),
                                        r"input channels"),
        "float conv short bias": (lambda mod: mod.float_conv3d(x32, wf, np.zeros(3, np.float32),
                                                               epilogue="float"), r"\bbias\b"),
        "float conv int32 epilogue": (lambda mod: mod.float_conv3d(x32, wf, epilogue="int32"),
                                      r"epilogue"),
        "float conv int thresholds": (lambda mod: mod.float_conv3d(x32, wf, lo=ilo, hi=ihi),
                                      r"\blo\b.*float32"),
        "float conv stride 0": (lambda mod: mod.float_conv3d(x32, wf, epilogue="float", stride=0),
                                r"\bstride\b"),
        "upsample too large": (lambda mod: mod.upsample(m, (7, 6, 6)), r"out_shape"),
        "upsample too small": (lambda mod: mod.upsample(m, (6, 6, 4)), r"out_shape"),
        "upsample 2 axes": (lambda mod: mod.upsample(m, (6, 6)), r"out_shape"),
        "concat shapes": (lambda mod: mod.concat(m, m_other), r"concat.*shape"),
        "max_pool not a map": (lambda mod: mod.max_pool(x32), r"\bm\b"),
        "pack empty x": (lambda mod: mod.pack(np.zeros((0, 3, 3, 8), np.float32), lo, hi),
                         r"\bx\b.*empty"),
        "pack big-endian x": (lambda mod: mod.pack(x32.astype(">f4"), lo, hi), r"\bx\b.*float32"),
        "pack 3-D x": (lambda mod: mod.pack(x32[0], lo, hi), r"\bx\b.*4-D"),
        "conv stride 256": (lambda mod: mod.ternary_conv3d(m, w, stride=256, lo=ilo, hi=ihi),
                            r"\bstride\b"),
        "conv stride 4 ints": (lambda mod: mod.ternary_conv3d(m, w, stride=(1, 1, 1, 1), lo=ilo,
                                                              hi=ihi), r"\bstride\b"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("module", [K, R], ids=["kernels", "reference"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_value_error(module, name):
    call, match = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call(module)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_threads(threads):
    _, m = rand_map(rng_for("threads"), (3, 3, 3), 8, 0.3)
    x = np.zeros((3, 3, 3, 8), np.float32)
    v = np.zeros(8, np.float32)
    w = np.zeros((8, 8, 1, 1, 1), np.int8)
    calls = [lambda: K.pack(x, v, v, threads=threads), lambda: K.unpack(m, threads=threads),
             lambda: K.max_pool(m, threads=threads), lambda: K.upsample(m, threads=threads),
             lambda: K.concat(m, m, threads=threads),
             lambda: K.ternary_conv3d(m, w, epilogue="int32", threads=threads),
             lambda: K.float_conv3d(x, w.astype(np.float32), epilogue="float", threads=threads)]
    for call in calls:
        with pytest.raises(ValueError, match=r"\bthreads\b"):
            call()


@pytest.mark.parametrize("name", ["sse9", "AVX2", "", "neon"])
def test_set_path_unknown(name):
    before = K.current_path()
    with pytest.raises(ValueError, match="kernel path"):
        K.set_path(name)
    with pytest.raises(ValueError, match="kernel path"):
        with K.use_path(name):
            pass
    assert K.current_path() == before


def test_read_only_inputs():
    """Read-only arrays (e.g. memory-mapped weights) are accepted and give the same results."""
    rng = rng_for("read-only")
    x = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    lo = np.full(9, -0.5, np.float32)
    hi = np.full(9, 0.5, np.float32)
    w = rand_weights(rng, 9, 9, (3, 3, 3), 0.3)
    wf = rng.standard_normal((9, 9, 3, 1, 3)).astype(np.float32)
    for a in (x, lo, hi, w, wf):
        a.flags.writeable = False
    m = K.pack(x, lo, hi)
    assert_map_equal(m, R.pack(x, lo, hi))
    m.data.flags.writeable = False
    assert_array_equal(K.ternary_conv3d(m, w, epilogue="int32"),
                       R.ternary_conv3d(m, w, epilogue="int32"))
    assert_array_equal(K.float_conv3d(x, wf, epilogue="float"),
                       R.float_conv3d(x, wf, epilogue="float"))
    assert_map_equal(K.max_pool(m), R.max_pool(m))
    assert_map_equal(K.upsample(m, (5, 10, 13)), R.upsample(m, (5, 10, 13)))
    assert_map_equal(K.concat(m, m), R.concat(m, m))


def test_concurrent_calls_from_python_threads():
    """The GIL is released during C calls; concurrent calls keep separate scratch and outputs."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [conv_case(case) for case in CONV_CASES[5:13]]

    def run(c):
        return K.ternary_conv3d(c["x"], c["w"], epilogue="int32", threads=1, **c["kw"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, cases * 3))
    for c, got in zip(cases * 3, results):
        assert_array_equal(got, c["ref"]["int32"])


def test_c_api_sizes():
    lib = K.lib
    assert lib.tk_abi_version() == K.ABI_VERSION
    for c in CHANNELS:
        assert lib.tk_channel_bytes(c) == channel_bytes(c)
    assert lib.tk_channel_bytes(0) == 0 and lib.tk_channel_bytes(-8) == 0
    assert [lib.tk_conv_out_size(n, 2) for n in (1, 2, 3, 7)] == [1, 1, 2, 4]
    assert lib.tk_conv_out_size(7, 3) == 3 and lib.tk_conv_out_size(0, 1) == 0
    assert lib.tk_conv_out_size(5, 0) == 0
    for cout, cin, kernel in WEIGHT_CASES:
        words = K.pack_weights(np.zeros((cout, cin) + kernel, np.int8)).words
        assert lib.tk_packed_weights_words(cout, cin, *kernel) == words.size
    assert lib.tk_packed_weights_words(0, 8, 3, 3, 3) == 0


def test_c_api_rejects_bad_arguments():
    """The C checks are a second line behind the binding: bad scalars give a negative status and
    leave the output untouched."""
    lib, ffi = K.lib, K.ffi
    before = lib.tk_current_path()
    assert lib.tk_select_path(4) == -3 and lib.tk_select_path(-2) == -3
    assert lib.tk_current_path() == before

    _, x = rand_map(rng_for("c-api"), (3, 3, 3), 8, 0.3)
    words = K.pack_weights(np.ones((8, 8, 3, 3, 3), np.int8)).words
    out = np.full(27 * 8, 7, np.int32)
    ptr = lambda ctype, a: ffi.cast(ctype, ffi.from_buffer(a))  # noqa: E731

    def conv(epilogue=2, lo=ffi.NULL, hi=ffi.NULL, xp=None, **changes):
        p = ffi.new("tk_conv_params *")
        p.in_d = p.in_h = p.in_w = 3
        p.in_channels = p.out_channels = 8
        p.k_d = p.k_h = p.k_w = 3
        p.stride_d = p.stride_h = p.stride_w = 1
        p.dilation_d = p.dilation_h = p.dilation_w = 1
        for k, v in changes.items():
            setattr(p, k, v)
        xp = ptr("uint8_t *", x.data) if xp is None else xp
        return lib.tk_ternary_conv3d(p, xp, ptr("uint64_t *", words), epilogue, lo, hi, ffi.NULL,
                                     ffi.NULL, ffi.from_buffer(out), 1)

    assert conv() == 0  # the valid call works
    assert_array_equal(out.reshape(3, 3, 3, 8),
                       R.ternary_conv3d(x, np.ones((8, 8, 3, 3, 3), np.int8), epilogue="int32"))
    out[:] = 7
    for bad in (dict(k_h=2), dict(k_w=0), dict(stride_d=0), dict(stride_w=256), dict(dilation_h=0),
                dict(dilation_d=256), dict(in_w=0), dict(in_channels=0), dict(out_channels=-1),
                dict(epilogue=3), dict(epilogue=-1), dict(epilogue=0), dict(epilogue=1),
                dict(xp=ffi.NULL)):
        assert conv(**bad) == -1, bad
    # |acc| <= taps * Cin must fit int32: refused before any buffer is read
    assert conv(in_channels=2**30) == -4
    assert np.all(out == 7)

    f = np.zeros(8, np.float32)
    assert lib.tk_pack(ptr("float *", f), 0, 8, ptr("float *", f), ptr("float *", f),
                       ptr("uint8_t *", x.data), 1) == -1
    assert lib.tk_upsample(ptr("uint8_t *", x.data), 3, 3, 3, 8, 7, 6, 6,
                           ptr("uint8_t *", np.zeros(7 * 6 * 6 * 2, np.uint8)), 1) == -1
    w2 = np.full(27, 2, np.int8)
    assert lib.tk_pack_weights(ptr("int8_t *", w2), 1, 1, 3, 3, 3,
                               ptr("uint64_t *", np.zeros(64, np.uint64))) == -1


# ------------------------------------------------------------------------------------ loading

def _run_python(code, **env):
    """A fresh interpreter with the same library as this one ($TERNARYSEG_KERNELS_LIB is kept, so
    a sanitizer run checks its own build) and no forced path unless given."""
    full_env = {k: v for k, v in os.environ.items() if k != "TERNARYSEG_KERNEL_PATH"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)


def test_missing_library_import_error_says_how_to_build():
    code = ("import sys\n"
            "try:\n"
            "    import TernarySegmentationLib.kernels\n"
            "except ImportError as error:\n"
            "    print('IMPORT-ERROR', error)\n"
            "    sys.exit(0)\n"
            "sys.exit(3)\n")
    result = _run_python(code, TERNARYSEG_KERNELS_LIB="/nonexistent/libx.so")
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "IMPORT-ERROR" in result.stdout
    assert "/nonexistent/libx.so" in result.stdout
    assert "pip install ." in result.stdout


def test_kernel_path_environment_variable():
    code = ("from TernarySegmentationLib import kernels as K\n"
            "print(K.current_path())\n")
    result = _run_python(code, TERNARYSEG_KERNEL_PATH="portable")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["portable"]
    # without the variable the best path is chosen
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [PATHS[-1]]
