"""Python binding of the C ternary kernels (kernels/), same names and arguments as ``reference``.

The library is found, in order: the shared library named by $TERNARYSEG_KERNELS_LIB (ABI mode, used
for sanitizer builds), the cffi extension built by ``pip install .`` (``_ternary_kernels``), a
CMake-built ``ternary_kernels`` shared library beside this file (the Slicer extension build).
cffi releases the GIL during every C call, so a worker thread can run the network while a GUI lives.

The instruction-set path is chosen from the CPU at load time; $TERNARYSEG_KERNEL_PATH (portable,
scalar, avx2, avx512) or ``use_path`` forces one, for tests and benchmarks.
"""

import contextlib
import os
import sys

import numpy as np

from . import _checks
from .packed import OCTET, PackedWeights, TernaryMap, channel_bytes, conv_out_size, k_words
from .reference import classifier_tables  # numpy: the tables belong to the model, not to a path

ABI_VERSION = 2
PATHS = ("portable", "scalar", "avx2", "avx512")
_EPILOGUE_CODES = {"ternary": 0, "float": 1, "int32": 2}
_ERRORS = {-1: "invalid argument", -2: "out of memory", -3: "unsupported path", -4: "size overflow"}

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_HINT = ("build it with `pip install .` from the TernarySegmentation repository root (needs a C "
               "compiler), or build kernels/CMakeLists.txt and put the library beside this file, "
               "or point $TERNARYSEG_KERNELS_LIB at a built library")


def _shared_library_names():
    if sys.platform == "win32":
        return ["ternary_kernels.dll"]
    if sys.platform == "darwin":
        return ["libternary_kernels.dylib"]
    return ["libternary_kernels.so"]


def _load():
    explicit = os.environ.get("TERNARYSEG_KERNELS_LIB")
    if explicit:
        return _dlopen(explicit), explicit
    # built by pip install . (cffi API mode); only from this folder, never found elsewhere by an
    # import hook (an editable install's finder would otherwise answer for a Slicer build tree)
    if any(name.startswith("_ternary_kernels.") for name in os.listdir(_HERE)):
        try:
            from . import _ternary_kernels

            return (_ternary_kernels.ffi, _ternary_kernels.lib), _ternary_kernels.__file__
        except ImportError:
            pass
    for name in _shared_library_names():
        path = os.path.join(_HERE, name)
        if os.path.exists(path):
            return _dlopen(path), path
    raise ImportError(f"The TernarySegmentation C kernels are not built: {_BUILD_HINT}.")


def _dlopen(path):
    import cffi

    from ._kernels_cdef import CDEF

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        # Never unload: OpenMP worker threads may still be parked in the library at exit.
        lib = ffi.dlopen(path, ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0))
    except OSError as error:
        raise ImportError(f"Cannot load the kernels library {path!r}: {error}. {_BUILD_HINT}.") from error
    return ffi, lib


(ffi, lib), LIBRARY_PATH = _load()
if lib.tk_abi_version() != ABI_VERSION:
    raise ImportError(f"The kernels library {LIBRARY_PATH!r} has ABI version {lib.tk_abi_version()}, "
                      f"this binding needs {ABI_VERSION}: rebuild it ({_BUILD_HINT}).")


# ------------------------------------------------------------------------------------ dispatch

def available_paths():
    """Names of the instruction-set paths this CPU and build can run, slowest first."""
    mask = lib.tk_supported_paths()
    return [name for i, name in enumerate(PATHS) if mask & (1 << i)]


def current_path():
    return PATHS[lib.tk_current_path()]


def set_path(name):
    """Force a path ('portable', 'scalar', 'avx2', 'avx512') or 'auto' for the best; returns it."""
    if name == "auto":
        return PATHS[lib.tk_select_path(-1)]
    if name not in PATHS:
        raise ValueError(f"kernel path must be one of {PATHS} or 'auto', got {name!r}")
    if lib.tk_select_path(PATHS.index(name)) < 0:
        raise ValueError(f"kernel path {name!r} is not supported here; available: {available_paths()}")
    return name


@contextlib.contextmanager
def use_path(name):
    """Context manager running the enclosed calls on one path (process-wide; not thread-safe)."""
    previous = current_path()
    set_path(name)
    try:
        yield name
    finally:
        set_path(previous)


def max_threads():
    """Threads used by default (all cores as OpenMP sees them; 1 in a build without OpenMP)."""
    return lib.tk_max_threads()


_forced = os.environ.get("TERNARYSEG_KERNEL_PATH")
if _forced:
    set_path(_forced)


# ------------------------------------------------------------------------------------ helpers

def _threads(threads):
    if threads is None:
        return 0
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None (all cores), got {threads!r}")
    return int(threads)


def _ptr(ctype, a):
    return ffi.cast(ctype, ffi.from_buffer(a)) if a is not None else ffi.NULL


def _call(name, status):
    if status != 0:
        raise RuntimeError(f"{name} failed in the C kernels: {_ERRORS.get(status, status)}")


def _params(shape, cin, cout, kernel_size, stride, dilation):
    p = ffi.new("tk_conv_params *")
    p.in_d, p.in_h, p.in_w = shape
    p.in_channels, p.out_channels = cin, cout
    p.k_d, p.k_h, p.k_w = kernel_size
    p.stride_d, p.stride_h, p.stride_w = stride
    p.dilation_d, p.dilation_h, p.dilation_w = dilation
    return p


# ------------------------------------------------------------------------------------ the ops

def pack(x, lo, hi, threads=None):
    """float32 (D, H, W, C) -> TernaryMap: +1 where x > hi[c], -1 where x < lo[c], else 0."""
    _checks.check_array("x", x, np.float32, ndim=4)
    lo = _checks.check_channel_vector("lo", lo, x.shape[3], np.float32)
    hi = _checks.check_channel_vector("hi", hi, x.shape[3], np.float32)
    out = TernaryMap.zeros(x.shape[:3], x.shape[3])
    _call("tk_pack", lib.tk_pack(_ptr("float *", x), x.size // x.shape[3], x.shape[3],
                                 _ptr("float *", lo), _ptr("float *", hi),
                                 _ptr("uint8_t *", out.data), _threads(threads)))
    return out


def unpack(m, threads=None):
    """TernaryMap -> int8 (D, H, W, C) in {-1, 0, +1}."""
    _checks.check_map("m", m)
    out = np.empty(m.shape + (m.channels,), np.int8)
    _call("tk_unpack", lib.tk_unpack(_ptr("uint8_t *", m.data), int(np.prod(m.shape)), m.channels,
                                     _ptr("int8_t *", out), _threads(threads)))
    return out


def pack_weights(w):
    """int8 (Cout, Cin, kd, kh, kw) in {-1, 0, +1} -> PackedWeights for ternary_conv3d."""
    w = _checks.check_ternary_weights("w", w)
    cout, cin, kd, kh, kw = w.shape
    words = np.zeros((-(-cout // OCTET), k_words(cin, (kd, kh, kw)), 2, OCTET), np.uint64)
    _call("tk_pack_weights", lib.tk_pack_weights(_ptr("int8_t *", w), cout, cin, kd, kh, kw,
                                                 _ptr("uint64_t *", words)))
    return PackedWeights(words, w)


def ternary_conv3d(x, w, stride=1, dilation=1, epilogue="ternary", lo=None, hi=None, scale=None,
                   bias=None, threads=None):
    """Ternary weights x packed ternary input, zero 'same' padding, out = ceil(in / stride).

    ``w``: PackedWeights (pack once, reuse) or int8 (Cout, Cin, kd, kh, kw). epilogue 'ternary'
    returns a TernaryMap (+1 if acc > hi[c], -1 if acc < lo[c], int32 thresholds); 'float' returns
    float32 (D, H, W, Cout) = scale * acc + bias; 'int32' the raw accumulators.
    """
    _checks.check_map("x", x)
    if not isinstance(w, PackedWeights):
        w = pack_weights(w)
    stride, dilation = _checks.check_conv(x.channels, w.ternary.shape, stride, dilation, epilogue)
    cout = w.out_channels
    lo, hi, scale, bias = _checks.check_epilogue_args(epilogue, cout, lo, hi, scale, bias, np.int32)
    out_shape = conv_out_size(x.shape, stride)
    if epilogue == "ternary":
        out = TernaryMap.zeros(out_shape, cout)
        buffer = out.data
    else:
        if epilogue == "float":
            scale = np.ones(cout, np.float32) if scale is None else scale
            bias = np.zeros(cout, np.float32) if bias is None else bias
        out = buffer = np.empty(out_shape + (cout,), np.float32 if epilogue == "float" else np.int32)
    p = _params(x.shape, x.channels, cout, w.kernel_size, stride, dilation)
    _call("tk_ternary_conv3d", lib.tk_ternary_conv3d(
        p, _ptr("uint8_t *", x.data), _ptr("uint64_t *", w.words), _EPILOGUE_CODES[epilogue],
        _ptr("int32_t *", lo), _ptr("int32_t *", hi), _ptr("float *", scale), _ptr("float *", bias),
        ffi.from_buffer(buffer), _threads(threads)))
    return out


def float_conv3d(x, w, bias=None, stride=1, dilation=1, epilogue="ternary", lo=None, hi=None,
                 threads=None):
    """Float weights (Cout, Cin, kd, kh, kw) x float32 (D, H, W, Cin): y = acc + bias; 'ternary'
    packs y with float thresholds (lo, hi) into a TernaryMap, 'float' returns y (D, H, W, Cout)."""
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
    out_shape = conv_out_size(x.shape[:3], stride)
    if epilogue == "ternary":
        out = TernaryMap.zeros(out_shape, cout)
        buffer = out.data
    else:
        out = buffer = np.empty(out_shape + (cout,), np.float32)
    p = _params(x.shape[:3], x.shape[3], cout, w.shape[2:], stride, dilation)
    _call("tk_float_conv3d", lib.tk_float_conv3d(
        p, _ptr("float *", x), _ptr("float *", w), _ptr("float *", bias), _EPILOGUE_CODES[epilogue],
        _ptr("float *", lo), _ptr("float *", hi), ffi.from_buffer(buffer), _threads(threads)))
    return out


def max_pool(m, threads=None):
    """2x2x2 ternary max pool, stride 2, output ceil(n / 2) per axis."""
    _checks.check_map("m", m)
    out = TernaryMap.zeros(conv_out_size(m.shape, (2, 2, 2)), m.channels)
    _call("tk_max_pool", lib.tk_max_pool(_ptr("uint8_t *", m.data), *m.shape, m.channels,
                                         _ptr("uint8_t *", out.data), _threads(threads)))
    return out


def upsample(m, out_shape=None, threads=None):
    """Nearest-neighbour x2 upsampling to out_shape (default 2x; each axis 2n-1 or 2n)."""
    _checks.check_map("m", m)
    out_shape = _checks.check_upsample_shape(m.shape, out_shape)
    out = TernaryMap.zeros(out_shape, m.channels)
    _call("tk_upsample", lib.tk_upsample(_ptr("uint8_t *", m.data), *m.shape, m.channels, *out_shape,
                                         _ptr("uint8_t *", out.data), _threads(threads)))
    return out


def concat(a, b, threads=None):
    """Channel concatenation [a | b] of two maps of the same spatial shape."""
    _checks.check_map("a", a)
    _checks.check_map("b", b)
    if a.shape != b.shape:
        raise ValueError(f"concat needs equal spatial shapes, got a {a.shape} and b {b.shape}")
    out = TernaryMap.zeros(a.shape, a.channels + b.channels)
    _call("tk_concat", lib.tk_concat(_ptr("uint8_t *", a.data), a.channels, _ptr("uint8_t *", b.data),
                                     b.channels, int(np.prod(a.shape)), _ptr("uint8_t *", out.data),
                                     _threads(threads)))
    return out


def classifier(x, weight, bias, tables=None, threads=None):
    """Float classifier on a ternary map, float32 (D, H, W, K); bit-identical to
    reference.classifier (same tables, same order of float32 additions). ``tables``: from
    ``classifier_tables(weight)`` (computed here unless given; a network computes them once)."""
    weight, bias, tables = _checks.check_classifier(x, weight, bias, tables)
    if tables is None:
        tables = classifier_tables(weight)
    nvox = int(np.prod(x.shape))
    out = np.empty(x.shape + (weight.shape[0],), np.float32)
    _call("tk_classify", lib.tk_classify(_ptr("uint8_t *", x.data), nvox, x.channels,
                                         _ptr("float *", tables), _ptr("float *", bias), weight.shape[0],
                                         _ptr("float *", out), _threads(threads)))
    return out


__all__ = ["pack", "unpack", "pack_weights", "ternary_conv3d", "float_conv3d", "max_pool", "upsample",
           "concat", "classifier", "classifier_tables", "available_paths", "current_path", "set_path",
           "use_path", "max_threads", "PackedWeights", "TernaryMap", "channel_bytes"]
