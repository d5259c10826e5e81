"""cffi API-mode build of the kernels as TernarySegmentationLib._ternary_kernels.

Run by `pip install .` (setup.py's cffi_modules); `python kernels/build_cffi.py` builds in place.
The CMake build (kernels/CMakeLists.txt) compiles the same sources into a plain shared library
that the binding loads in ABI mode.
"""

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = ["tk_dispatch.c", "tk_gemm_portable.c", "tk_gemm_x86.c", "tk_conv.c", "tk_maps.c"]


def _load_cdef():
    path = os.path.join(ROOT, "TernarySegmentation", "TernarySegmentationLib", "_kernels_cdef.py")
    namespace = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)  # a plain string constant, no imports
    return namespace["CDEF"]


def _flags():
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/fp:precise"], []
    compile_args = ["-O3", "-std=c11", "-ffp-contract=off", "-fvisibility=hidden"]
    link_args = []
    if sys.platform != "darwin" and os.environ.get("TERNARYSEG_NO_OPENMP") != "1":
        # Apple clang has no OpenMP by default: macOS builds run single-threaded kernels.
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return compile_args, link_args


ffibuilder = FFI()
ffibuilder.cdef(_load_cdef())
_compile_args, _link_args = _flags()
ffibuilder.set_source(
    "TernarySegmentationLib._ternary_kernels",
    '#include "ternary_kernels.h"',
    sources=[os.path.relpath(os.path.join(HERE, "src", s), ROOT) for s in SOURCES],
    include_dirs=[os.path.relpath(os.path.join(HERE, "include"), ROOT)],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
