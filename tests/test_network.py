"""The network executor (TernarySegmentationLib.network): the C kernels and the numpy reference give
exactly equal logits on random models and odd volume sizes; progress, cancellation, threads, memory
release, MAC counts, HU normalisation and the size report.

Models are random U-shaped graphs written and read through the model file (model_file), so every run
goes through the same validation a user's file does.
"""

import os
import subprocess
import sys
import threading
import weakref
import zlib

import numpy as np
import pytest

from TernarySegmentationLib import model_file as MF
from TernarySegmentationLib import reference as R
from TernarySegmentationLib.network import Cancelled, TernaryNetwork, classify, normalise_hu

K = pytest.importorskip("TernarySegmentationLib.kernels", reason="the C kernels are not built")

INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max
SIZES = [(13, 17, 11), (1, 1, 1), (2, 9, 5), (7, 7, 7), (16, 6, 3)]


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


class _Builder:
    """Collects nodes and tensors of a random graph."""

    def __init__(self, rng):
        self.rng, self.graph, self.tensors = rng, [], {}

    def _geometry(self):
        kernel = [int(k) for k in self.rng.choice([1, 3, 3, 5], 3)]
        dilation = [int(d) for d in self.rng.choice([1, 1, 2], 3)]
        return kernel, dilation

    def conv(self, source, cin, cout, first=False, stride=(1, 1, 1)):
        rng, name = self.rng, f"n{len(self.graph)}"
        kernel, dilation = self._geometry()
        node = {"name": name, "op": "float_conv3d" if first else "ternary_conv3d", "inputs": [source],
                "in_channels": cin, "out_channels": cout, "kernel": kernel, "stride": list(stride),
                "dilation": dilation}
        shape = (cout, cin) + tuple(kernel)
        if first:
            t = {"weight": rng.normal(0, 1, shape).astype(np.float32),
                 "bias": rng.normal(0, 0.3, cout).astype(np.float32),
                 "lo": rng.uniform(-2, -0.2, cout).astype(np.float32),
                 "hi": rng.uniform(0.2, 2, cout).astype(np.float32)}
        else:
            w = rng.integers(-1, 2, shape).astype(np.int8)
            w[rng.random(shape) < rng.uniform(0, 0.8)] = 0
            spread = max(1, int(np.sqrt(cin * np.prod(kernel)) * 0.5))
            lo = rng.integers(-2 * spread, 1, cout).astype(np.int32)
            hi = rng.integers(0, 2 * spread, cout).astype(np.int32)
            # a few constant channels: always +1 (hi = INT32_MIN), always -1 (lo = hi = INT32_MAX)
            if cout > 2:
                hi[0] = INT32_MIN
                lo[1] = hi[1] = INT32_MAX
            t = {"weight": w, "lo": lo, "hi": hi}
        node["tensors"] = {role: f"{name}.{role}" for role in t}
        self.tensors.update({f"{name}.{role}": a for role, a in t.items()})
        self.graph.append(node)
        return name

    def node(self, op, *inputs):
        name = f"n{len(self.graph)}"
        self.graph.append({"name": name, "op": op, "inputs": list(inputs)})
        return name

    def classifier(self, source, cin, k):
        name = f"n{len(self.graph)}"
        self.graph.append({"name": name, "op": "classifier", "inputs": [source], "in_channels": cin,
                           "classes": k, "tensors": {"weight": f"{name}.weight", "bias": f"{name}.bias"}})
        self.tensors[f"{name}.weight"] = self.rng.normal(0, 1, (k, cin)).astype(np.float32)
        self.tensors[f"{name}.bias"] = self.rng.normal(0, 1, k).astype(np.float32)


def random_model(seed, depth=2, base=None, classes=2):
    """A random U-shaped network: float conv, per level a conv then max_pool or a stride-2 conv, a
    bottom conv, per level upsample + concat (either order) + conv, classifier."""
    rng = rng_for("random_model", seed, depth, base, classes)
    b = _Builder(rng)
    c = [int(base or rng.choice([1, 3, 8, 13]))]
    x = b.conv("image", 1, c[0], first=True)
    skips = []
    for level in range(depth):
        x = b.conv(x, c[level], c[level])
        skips.append((x, c[level]))
        c.append(int(rng.choice([c[level], 2 * c[level], c[level] + 5])))
        if rng.random() < 0.5:
            x = b.node("max_pool", x)
            x = b.conv(x, c[level], c[level + 1])
        else:
            x = b.conv(x, c[level], c[level + 1], stride=(2, 2, 2))
    x = b.conv(x, c[depth], c[depth])
    cx = c[depth]
    for level in reversed(range(depth)):
        skip, cs = skips[level]
        up = b.node("upsample", x, skip)
        x = b.node("concat", *((skip, up) if rng.random() < 0.5 else (up, skip)))
        x = b.conv(x, cs + cx, c[level])
        cx = c[level]
    names = ["background", "pancreas", "other", "more"][:classes]
    b.classifier(x, cx, classes)
    return dict(graph=b.graph, tensors=b.tensors, classes=names,
                metadata={"name": f"random {seed}", "description": "", "variant": "test",
                          "training_data": "none", "validation_dice": None, "code_version": "test",
                          "created": "2025-01-31", "intended_use": "tests"},
                preprocessing={"model_spacing_mm": [1, 1, 1], "hu_window": [-100, 240], "orientation": "LPS"})


def network(seed, **kwargs):
    return TernaryNetwork(MF.read_model(MF.encode_model(**random_model(seed, **kwargs))))


def image_for(shape, seed=0):
    return rng_for("image", shape, seed).normal(0, 0.7, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("seed", range(6))
def test_kernels_equal_reference(seed):
    net = network(seed, depth=1 + seed % 2)
    for shape in SIZES[: 3 if seed % 2 else len(SIZES)]:
        x = image_for(shape, seed)
        expected = net.forward(x, ops=R)
        got = net.forward(x, ops=K)
        assert got.dtype == np.float32 and got.shape == shape + (len(net.classes),)
        assert np.array_equal(got, expected), (seed, shape)
        assert np.isfinite(got).all()


@pytest.mark.parametrize("shape, base", [((13, 17, 11), 8), ((37, 41, 29), 16)])
def test_every_kernel_path_gives_the_same_logits(shape, base):
    net = network(10, depth=2, base=base)
    x = image_for(shape)
    expected = net.forward(x, ops=R)
    for path in K.available_paths():
        with K.use_path(path):
            assert np.array_equal(net.forward(x, ops=K), expected), path


def test_threads_1_and_2_identical():
    net = network(11, depth=2, base=13, classes=3)
    x = image_for((21, 19, 17))
    one = net.forward(x, ops=K, threads=1)
    two = net.forward(x, ops=K, threads=2)
    assert np.array_equal(one, two)
    assert np.array_equal(net.forward(x, ops=K), one)  # default: all cores


def test_concurrent_forward_calls_from_python_threads():
    net = network(12, depth=1, base=8)
    x = image_for((9, 10, 11))
    expected = net.forward(x, ops=K, threads=1)
    results = [None] * 4

    def run(i):
        results[i] = net.forward(x, ops=K, threads=1)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(np.array_equal(r, expected) for r in results)


def test_logits_are_the_classifier_of_the_last_map():
    """float conv -> classifier: logits = unpack(map) @ W.T + b, computed independently."""
    rng = rng_for("direct")
    b = _Builder(rng)
    x = b.conv("image", 1, 8, first=True)
    b.classifier(x, 8, 3)
    kwargs = random_model(0)
    kwargs.update(graph=b.graph, tensors=b.tensors, classes=["a", "b", "c"])
    net = TernaryNetwork(MF.read_model(MF.encode_model(**kwargs)))
    image = image_for((6, 7, 8))
    node, t = b.graph[0], b.tensors
    m = R.float_conv3d(image[..., None], t["n0.weight"], t["n0.bias"], dilation=node["dilation"],
                       lo=t["n0.lo"], hi=t["n0.hi"])
    expected = R.unpack(m).astype(np.float64) @ t["n1.weight"].T.astype(np.float64) + t["n1.bias"]
    for ops in (R, K):
        got = net.forward(image, ops=ops)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(got, net.forward(image[..., None], ops=ops))  # (D, H, W, 1) too
    assert np.array_equal(net.forward(image.astype(np.float64), ops=K), net.forward(image, ops=K))


def test_classifier_chunks_do_not_change_the_logits(monkeypatch):
    net = network(13, depth=1, base=8)
    x = image_for((11, 5, 4))
    whole = net.forward(x, ops=K)
    monkeypatch.setattr(R, "CLASSIFIER_CHUNK_VOXELS", 7)
    assert np.array_equal(net.forward(x, ops=K), whole)
    assert np.array_equal(net.forward(x, ops=R), whole)


def test_bad_images_are_rejected():
    net = network(0, depth=1)
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4, 2), np.float32),
                np.zeros((0, 4, 4), np.float32), np.zeros((4, 4, 4), np.int16), [[[0.0]]]):
        with pytest.raises(ValueError, match="image"):
            net.forward(bad, ops=R)
    with pytest.raises(TypeError, match="model_file.Model"):
        TernaryNetwork({"graph": []})


# ------------------------------------------------------------------------------------ progress, cancel

def test_progress_is_monotone_and_reaches_one():
    net = network(3, depth=2)
    calls = []
    net.forward(image_for((13, 17, 11)), ops=K, progress=lambda f, stage: calls.append((f, stage)))
    fractions = [f for f, _ in calls]
    assert [stage for _, stage in calls] == [n["name"] for n in net.model.graph]
    assert all(0 <= a <= b <= 1 for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == 1.0
    assert fractions[0] > 0  # the first layer has MACs


def test_cancel_raises_between_nodes():
    net = network(4, depth=2)
    x = image_for((9, 8, 7))
    seen = []
    with pytest.raises(Cancelled):
        net.forward(x, ops=K, progress=lambda f, s: seen.append(s), cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3
    with pytest.raises(Cancelled):
        net.forward(x, ops=R, progress=lambda f, s: seen.append(s), cancel=lambda: True)
    assert len(seen) == 3  # cancelled before the first node
    assert np.array_equal(net.forward(x, ops=K, cancel=lambda: False), net.forward(x, ops=R))


# ------------------------------------------------------------------------------------ memory

class _Recorder:
    """An ops module stand-in: the reference ops, keeping a weak reference to every map they return."""

    def __init__(self):
        self.maps = []

    def __getattr__(self, name):
        op = getattr(R, name)

        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            if name != "pack_weights":
                self.maps.append(weakref.ref(out.data))
            return out
        return call

    def alive(self):
        return {i for i, ref in enumerate(self.maps) if ref() is not None}


def test_intermediate_maps_are_freed_after_their_last_use():
    kwargs = random_model(5, depth=2)
    graph = kwargs["graph"]
    net = TernaryNetwork(MF.read_model(MF.encode_model(**kwargs)))
    recorder, alive_after = _Recorder(), []
    logits = net.forward(image_for((6, 6, 6)), ops=recorder,
                         progress=lambda f, stage: alive_after.append(recorder.alive()))
    assert logits.shape == (6, 6, 6, 2)
    # after node i (map i), exactly the maps that a later node reads, and map i, are alive
    for i in range(len(graph) - 1):
        later = {source for node in graph[i + 1:] for source in node["inputs"]}
        expected = {j for j in range(i + 1) if j == i or graph[j]["name"] in later}
        assert alive_after[i] == expected, (i, graph[i]["name"])
    assert alive_after[-1] == set()  # after the classifier only the logits are left


# ------------------------------------------------------------------------------------ sizes, MACs

def test_ternary_layers_are_over_90_percent_smaller_than_fp32():
    model = MF.read_model(MF.encode_model(**random_model(6, depth=2, base=16)))
    sizes = MF.model_sizes(model)
    assert sizes["ratio"] <= 0.10, sizes
    assert sizes["ternary_layers_bytes"] <= 0.10 * sizes["ternary_layers_fp32_bytes"]
    assert sizes["file_bytes"] < 0.2 * sizes["fp32_bytes"], sizes


def test_macs():
    kwargs = random_model(7, depth=2)
    net = TernaryNetwork(MF.read_model(MF.encode_model(**kwargs)))
    shape = (13, 17, 11)
    macs = net.macs(shape)
    assert list(macs) == [n["name"] for n in kwargs["graph"]]
    first = kwargs["graph"][0]
    assert macs[first["name"]] == 13 * 17 * 11 * first["out_channels"] * int(np.prod(first["kernel"]))
    cls = kwargs["graph"][-1]
    assert macs[cls["name"]] == 13 * 17 * 11 * cls["in_channels"] * cls["classes"]
    for node in kwargs["graph"]:
        if node["op"] in ("max_pool", "upsample", "concat"):
            assert macs[node["name"]] == 0
    with pytest.raises(ValueError):
        net.macs((4, 4))


# ------------------------------------------------------------------------------------ preprocessing

def test_normalise_hu():
    volume = np.array([-1000, -100, 70, 240, 3000], np.int16).reshape(1, 1, 5)
    out = normalise_hu(volume, [-100, 240])
    assert out.dtype == np.float32 and out.shape == volume.shape
    expected = 2 * (np.clip(volume.astype(np.float64), -100, 240) + 100) / 340 - 1
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0, 0] == out[0, 0, 1] == -1 and out[0, 0, 3] == out[0, 0, 4] == 1
    assert normalise_hu(volume.astype(np.float64), (-100.0, 240.0)).dtype == np.float32
    for window in ([240, -100], [0, 0], [np.nan, 1]):
        with pytest.raises(ValueError, match="hu_window"):
            normalise_hu(volume, window)


# ------------------------------------------------------------------------------------ dependencies

def test_reference_runs_without_the_c_kernels_and_nothing_imports_torch(tmp_path):
    path = tmp_path / "model.tsm"
    MF.write_model(path, **random_model(8, depth=1))
    script = f"""
import sys
import numpy as np
from TernarySegmentationLib import model_file, network, reference
net = network.TernaryNetwork(model_file.read_model({str(path)!r}))
logits = net.forward(np.zeros((5, 6, 7), np.float32), ops=reference)
assert logits.shape == (5, 6, 7, 2)
assert "TernarySegmentationLib.kernels" not in sys.modules
assert "torch" not in sys.modules
try:
    net.forward(np.zeros((5, 6, 7), np.float32))  # default ops: the C kernels, missing here
except ImportError as error:
    assert "not built" in str(error) or "Cannot load" in str(error), error
else:
    raise AssertionError("the kernels loaded")
print("ok")
"""
    env = dict(os.environ, TERNARYSEG_KERNELS_LIB=str(tmp_path / "missing.so"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_library_modules_never_import_torch():
    script = ("import sys, TernarySegmentationLib.model_file, TernarySegmentationLib.network, "
              "TernarySegmentationLib.kernels; assert 'torch' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("channels, classes", [(1, 2), (7, 2), (8, 3), (9, 2), (64, 4), (130, 2)])
def test_classify_equals_the_matrix_product(channels, classes):
    rng = rng_for("classify", channels, classes)
    q = rng.integers(-1, 2, (3, 4, 5, channels)).astype(np.int8)
    m = R.pack(q.astype(np.float32), np.full(channels, -0.5, np.float32), np.full(channels, 0.5, np.float32))
    w = rng.normal(0, 1, (classes, channels)).astype(np.float32)
    bias = rng.normal(0, 1, classes).astype(np.float32)
    got = classify(m, w, bias)
    assert got.dtype == np.float32 and got.shape == (3, 4, 5, classes)
    expected = q.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(channels))
    for threads in (1, 2):   # the C classifier: the same float32 sums in the same order
        assert np.array_equal(K.classifier(m, w, bias, threads=threads), got)
    assert np.array_equal(K.classifier(m, w, bias, tables=R.classifier_tables(w)), got)
    for ops in (K, R):
        with pytest.raises(ValueError, match="do not fit"):
            ops.classifier(m, w[:, :-1] if channels > 1 else np.zeros((classes, 2), np.float32), bias)
        with pytest.raises(ValueError, match="tables must have shape"):
            ops.classifier(m, w, bias, tables=np.zeros((1, 16, classes), np.float32))
        with pytest.raises(ValueError, match="bias"):
            ops.classifier(m, w, bias[:-1])
        with pytest.raises(ValueError, match="weight must have dtype float32"):
            ops.classifier(m, w.astype(np.float64), bias)
