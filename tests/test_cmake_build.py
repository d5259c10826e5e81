"""The CMake build of the kernels (kernels/CMakeLists.txt, the one the Slicer extension uses).

Configures and builds the stand-alone project into a temporary directory, then loads the library in a
fresh interpreter through $TERNARYSEG_KERNELS_LIB (cffi ABI mode) and checks a small 3x3x3 ternary
convolution against the numpy reference on every instruction-set path.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_DIR = os.path.join(ROOT, "kernels")
PACKAGE_PARENT = os.path.join(ROOT, "TernarySegmentation")


def _library_name():
    if sys.platform == "win32":
        return "ternary_kernels.dll"
    if sys.platform == "darwin":
        return "libternary_kernels.dylib"
    return "libternary_kernels.so"


def _have_c_compiler():
    candidates = [os.environ.get("CC", "").split(" ")[0]] + ["cc", "gcc", "clang", "cl"]
    return any(c and shutil.which(c) for c in candidates)


pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(not _have_c_compiler(), reason="no C compiler found"),
]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def cmake_library(tmp_path_factory):
    """Path of the ternary_kernels shared library built by CMake (Release) in a temporary directory."""
    build = tmp_path_factory.mktemp("cmake-kernels")
    _run(["cmake", "-S", KERNELS_DIR, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], timeout=300)
    _run(["cmake", "--build", str(build), "--config", "Release", "--parallel", "2"], timeout=600)
    path = build / _library_name()
    assert path.is_file(), f"{path} not built; build dir has {sorted(p.name for p in build.iterdir())}"
    return str(path)


SMOKE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import TernarySegmentationLib.kernels as K
    import TernarySegmentationLib.reference as R

    expected = sys.argv[1]
    assert os.path.samefile(K.LIBRARY_PATH, expected), (K.LIBRARY_PATH, expected)
    rng = np.random.default_rng(1234)
    cin, cout = 13, 11
    q = rng.integers(-1, 2, size=(6, 5, 7, cin)).astype(np.int8)
    x = R.pack(q.astype(np.float32), np.full(cin, -0.5, np.float32), np.full(cin, 0.5, np.float32))
    w = rng.integers(-1, 2, size=(cout, cin, 3, 3, 3)).astype(np.int8)
    lo = rng.integers(-6, 1, size=cout).astype(np.int32)
    hi = rng.integers(0, 7, size=cout).astype(np.int32)
    scale = rng.standard_normal(cout).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    want_acc = R.ternary_conv3d(x, w, epilogue="int32")
    want_map = R.ternary_conv3d(x, w, epilogue="ternary", lo=lo, hi=hi)
    want_float = R.ternary_conv3d(x, w, epilogue="float", scale=scale, bias=bias)
    paths = K.available_paths()
    assert "portable" in paths, paths
    for path in paths:
        with K.use_path(path):
            assert K.current_path() == path
            got = K.ternary_conv3d(x, w, epilogue="int32")
            assert np.array_equal(got, want_acc), path
            got = K.ternary_conv3d(x, K.pack_weights(w), epilogue="ternary", lo=lo, hi=hi)
            assert np.array_equal(got.data, want_map.data), path
            got = K.ternary_conv3d(x, w, epilogue="float", scale=scale, bias=bias)
            assert np.array_equal(got, want_float), path
    print("paths:", " ".join(paths))
""")


def test_cmake_library_matches_reference_on_every_path(cmake_library):
    env = dict(os.environ)
    env["TERNARYSEG_KERNELS_LIB"] = cmake_library
    env.pop("TERNARYSEG_KERNEL_PATH", None)
    # The repository's binding, whatever is installed: ABI mode needs no compiled extension.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    result = _run([sys.executable, "-c", SMOKE, cmake_library], env=env, cwd=ROOT, timeout=300)
    assert "paths: portable" in result.stdout


def test_cmake_library_exports_only_the_api(cmake_library):
    from TernarySegmentationLib import kernels

    lib = ctypes.CDLL(cmake_library)
    assert lib.tk_abi_version() == kernels.ABI_VERSION
    for name in ("tk_ternary_conv3d", "tk_float_conv3d", "tk_pack", "tk_max_pool", "tk_concat", "tk_classify"):
        assert hasattr(lib, name), name
    # Internal helpers stay hidden (C_VISIBILITY_PRESET hidden + TK_API on the public functions).
    for name in ("tk_k_words", "tk_gemm_portable", "tk_selected_gemm", "tk_check_conv_params"):
        assert not hasattr(lib, name), f"{name} is exported"


UNLOAD = textwrap.dedent("""
    import time
    import numpy as np
    import TernarySegmentationLib.kernels as K
    import TernarySegmentationLib.reference as R

    x = R.pack(np.ones((8, 8, 8, 16), np.float32), np.full(16, -0.5, np.float32),
               np.full(16, 0.5, np.float32))
    K.ternary_conv3d(x, np.ones((16, 16, 3, 3, 3), np.int8), epilogue="int32", threads=2)
    K.ffi.dlclose(K.lib)  # what cffi does anyway when the interpreter exits
    time.sleep(0.3)
    print("survived")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF -z nodelete is Linux-only")
def test_unloading_the_library_with_idle_openmp_threads_does_not_crash(cmake_library):
    # cffi ABI mode dlcloses the library at exit; without -z nodelete that could unmap libgomp while
    # its idle workers spin in it (a SIGSEGV after the work is done, ~1 exit in 10). OMP_WAIT_POLICY
    # =active keeps them spinning, so the crash would be certain here.
    env = dict(os.environ, TERNARYSEG_KERNELS_LIB=cmake_library, OMP_WAIT_POLICY="active")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", UNLOAD], env=env, cwd=ROOT, capture_output=True,
                            text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr)


def test_slicer_module_cmake_lists_every_lib_file():
    """slicerMacroBuildScriptedModule gets an explicit file list: every Lib module must be in it."""
    root = Path(__file__).resolve().parents[1]
    listed = (root / "TernarySegmentation" / "CMakeLists.txt").read_text()
    lib = root / "TernarySegmentation" / "TernarySegmentationLib"
    missing = [f.name for f in sorted(lib.glob("*.py")) if f"${{MODULE_NAME}}Lib/{f.name}" not in listed]
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in TernarySegmentation/CMakeLists.txt: {missing}"


def test_slicer_module_cmake_lists_exist_and_cover_the_resources():
    """Every file the module's CMakeLists names exists (else the Slicer build fails), and every
    resource file is installed (else the module cannot find it in an installed Slicer)."""
    module = Path(__file__).resolve().parents[1] / "TernarySegmentation"
    text = (module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "TernarySegmentation")
    listed = set(re.findall(r"^\s+((?:TernarySegmentation|Resources)[\w./-]*\.\w+)\s*$", text, re.M))
    assert "TernarySegmentation.py" in listed and "Resources/UI/TernarySegmentation.ui" in listed
    assert [name for name in sorted(listed) if not (module / name).is_file()] == []
    resources = {str(p.relative_to(module)) for p in (module / "Resources").rglob("*") if p.is_file()}
    assert sorted(resources - listed) == []


@pytest.fixture(scope="module")
def extension_build(tmp_path_factory):
    """The whole extension (top-level CMakeLists.txt) configured and built against a stand-in Slicer
    (tests/fake_slicer: Slicer's macro checks and build-tree layout, no Slicer)."""
    build = tmp_path_factory.mktemp("cmake-extension")
    fake = os.path.join(ROOT, "tests", "fake_slicer")
    _run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DSlicer_DIR={fake}",
          "-DBUILD_TESTING=ON"], timeout=300)
    _run(["cmake", "--build", str(build), "--config", "Release", "--parallel", "2"], timeout=600)
    return build


def test_extension_builds_the_module_with_the_kernels_beside_the_lib(extension_build, tmp_path):
    """In the module's build tree, with no compiler, pip or environment variable, the Lib loads the
    CMake-built library with cffi, and the batch script segments a CT with the installed model."""
    modules = extension_build / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    lib = modules / "TernarySegmentationLib"
    assert (lib / _library_name()).is_file()
    for name in ("TernarySegmentation.py", "Resources/UI/TernarySegmentation.ui",
                 "Resources/Models/pancreas-phantom-ternary.tsm", "TernarySegmentationLib/slicer_logic.py"):
        assert (modules / name).is_file(), name
    assert not list(lib.glob("_ternary_kernels*")), "the pip-built cffi module must not be in the build tree"
    config = (extension_build / "fake-slicer-extension.txt").read_text()
    assert "category=Segmentation" in config and "python_tests=TernarySegmentation.py" in config

    env = {k: v for k, v in os.environ.items() if k not in ("TERNARYSEG_KERNELS_LIB", "TERNARYSEG_KERNEL_PATH")}
    check = ("import sys, TernarySegmentationLib.kernels as K, TernarySegmentationLib.pipeline as P; "
             "print(K.LIBRARY_PATH); print(P.default_model_path())")
    found = _run([sys.executable, "-c", check], cwd=str(modules), env=env, timeout=120).stdout.split()
    assert os.path.samefile(found[0], lib / _library_name())
    assert os.path.samefile(found[1], modules / "Resources" / "Models" / "pancreas-phantom-ternary.tsm")

    ct = os.path.join(os.path.dirname(ROOT), "shared", "data", "ct", "example_ct_sm.nii.gz")
    if not os.path.isfile(ct):
        import SimpleITK as sitk

        from TernarySegmentationLib.phantom import make_phantom
        ct = str(tmp_path / "phantom.nii.gz")
        sitk.WriteImage(make_phantom(7, shape=(32, 64, 64), spacing=(4.0, 4.0, 5.0)).to_sitk()[0], ct)
    out = tmp_path / "out.seg.nrrd"
    done = _run([sys.executable, str(lib / "batch.py"), "--input", ct, "--output", str(out)], env=env, timeout=300)
    assert "1 case: 1 segmented" in done.stdout and out.is_file()


def test_a_library_of_another_abi_version_is_refused(tmp_path):
    """A stale kernels library (an older build beside the Lib, or a wrong $TERNARYSEG_KERNELS_LIB)
    is refused at import with a message, never called with mismatched declarations."""
    from TernarySegmentationLib import kernels

    source = tmp_path / "old.c"
    source.write_text(f"int tk_abi_version(void) {{ return {kernels.ABI_VERSION - 1}; }}\n")
    library = tmp_path / _library_name()
    compiler = os.environ.get("CC", "").split(" ")[0] or next(
        c for c in ("cc", "gcc", "clang") if shutil.which(c))
    _run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], timeout=120)
    env = dict(os.environ, TERNARYSEG_KERNELS_LIB=str(library))
    result = subprocess.run([sys.executable, "-c", "import TernarySegmentationLib.kernels"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and f"ABI version {kernels.ABI_VERSION - 1}" in result.stderr
