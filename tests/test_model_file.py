"""The model file format (TernarySegmentationLib.model_file, docs/model-format.md): round trip, layout,
the writer's refusals and atomicity, every validation rule triggered on purpose, truncation, and a
fuzz test holding the reader to its promise: a bad file raises ModelFileError and nothing else.

Files are assembled here independently of the writer (``assemble``), so a header can be broken on
purpose and still carry a correct checksum.
"""

import copy
import hashlib
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest

from TernarySegmentationLib import model_file as MF
from TernarySegmentationLib.model_file import ModelFileError, read_model, write_model

CLASSES = ["background", "pancreas"]


# ------------------------------------------------------------------------------------ helpers

def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def metadata(**extra):
    return {"name": "test model", "description": "random weights for tests", "variant": "tiny",
            "training_data": "none", "validation_dice": None, "code_version": "test",
            "created": "2025-01-31T12:00:00Z", "intended_use": "tests only", **extra}


def preprocessing():
    return {"model_spacing_mm": [1.5, 1.5, 2.0], "hu_window": [-100, 240], "orientation": "LPS"}


def every_op_model(seed=0, c=8):
    """float_conv3d 1->c, ternary c->c, max_pool, ternary c->2c, upsample like, concat -> 3c,
    ternary 3c->c, classifier c->2: the keyword arguments of write_model."""
    rng = rng_for("every_op_model", seed, c)
    graph, tensors = [], {}

    def conv(name, source, cin, cout, first=False, kernel=(3, 3, 3), stride=(1, 1, 1), dilation=(1, 1, 1)):
        node = {"name": name, "op": "float_conv3d" if first else "ternary_conv3d", "inputs": [source],
                "in_channels": cin, "out_channels": cout, "kernel": list(kernel), "stride": list(stride),
                "dilation": list(dilation), "tensors": {}}
        if first:
            tensors[f"{name}.weight"] = rng.normal(0, 1, (cout, cin) + kernel).astype(np.float32)
            tensors[f"{name}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
            tensors[f"{name}.lo"] = np.full(cout, -1.0, np.float32)
            tensors[f"{name}.hi"] = np.full(cout, 1.0, np.float32)
        else:
            tensors[f"{name}.weight"] = rng.integers(-1, 2, (cout, cin) + kernel).astype(np.int8)
            t = int(np.sqrt(cin * np.prod(kernel) * 0.6) * 0.5)
            tensors[f"{name}.lo"] = np.full(cout, -t, np.int32)
            tensors[f"{name}.hi"] = rng.integers(t, t + 3, cout).astype(np.int32)
        node["tensors"] = {role: f"{name}.{role}" for role in
                           (("weight", "bias", "lo", "hi") if first else ("weight", "lo", "hi"))}
        graph.append(node)

    conv("c0", "image", 1, c, first=True)
    conv("c1", "c0", c, c)
    graph.append({"name": "pool", "op": "max_pool", "inputs": ["c1"]})
    conv("c2", "pool", c, 2 * c, kernel=(3, 1, 3), dilation=(1, 2, 1))
    graph.append({"name": "up", "op": "upsample", "inputs": ["c2", "c1"]})
    graph.append({"name": "cat", "op": "concat", "inputs": ["c1", "up"]})
    conv("c3", "cat", 3 * c, c)
    graph.append({"name": "cls", "op": "classifier", "inputs": ["c3"], "in_channels": c, "classes": 2,
                  "tensors": {"weight": "cls.weight", "bias": "cls.bias"}})
    tensors["cls.weight"] = rng.normal(0, 1, (2, c)).astype(np.float32)
    tensors["cls.bias"] = np.array([0.5, -0.5], np.float32)
    return dict(graph=graph, tensors=tensors, metadata=metadata(), preprocessing=preprocessing(),
                classes=list(CLASSES))


def assemble(header, payload, version=1):
    """A model file from a header (dict, str or bytes) and payload bytes, with padding and checksum,
    written from the specification (not with the library's writer)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    body = MAGIC + struct.pack("<II", version, len(header)) + header
    body += bytes(-len(body) % 16) + bytes(payload)
    return body + hashlib.sha256(body).digest()


def split(data):
    """A model file -> (header dict, payload bytes), per the specification."""
    assert data[:8] == MAGIC
    version, length = struct.unpack_from("<II", data, 8)
    assert version == 1
    start = 16 + length + (-(16 + length) % 16)
    return json.loads(data[16:16 + length]), data[start:-32]


def with_checksum(data):
    data = bytes(data)
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


MAGIC = b"TSEGMDL\0"
BASE = MF.encode_model(**every_op_model())
BASE_HEADER, BASE_PAYLOAD = split(BASE)


def raises(data, *fragments):
    """read_model(data) raises ModelFileError whose message contains every fragment."""
    with pytest.raises(ModelFileError) as info:
        read_model(data)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def tensor_bytes(name, header=BASE_HEADER):
    entry = header["tensors"][name]
    return entry["offset"], entry["offset"] + entry["nbytes"]


# ------------------------------------------------------------------------------------ round trip

def test_round_trip(tmp_path):
    kwargs = every_op_model()
    path = tmp_path / "model.tsm"
    n = write_model(path, **kwargs)
    data = path.read_bytes()
    assert n == len(data) == len(BASE)
    model = read_model(path)
    assert model.file_size == n
    assert model.sha256 == hashlib.sha256(data[:-32]).hexdigest() == data[-32:].hex()
    assert model.metadata == kwargs["metadata"]
    assert model.preprocessing == kwargs["preprocessing"]
    assert model.classes == tuple(CLASSES)
    assert list(model.graph) == kwargs["graph"]
    assert list(model.tensors) == list(kwargs["tensors"])
    for name, expected in kwargs["tensors"].items():
        got = model.tensors[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert np.array_equal(got, expected), name
        assert not got.flags.writeable, name
    # the same from bytes, from str paths, and the writer is deterministic
    assert read_model(data).sha256 == read_model(str(path)).sha256 == model.sha256
    assert MF.encode_model(**kwargs) == data


def test_layout_matches_the_specification():
    header, payload = split(BASE)
    length = struct.unpack_from("<I", BASE, 12)[0]
    payload_start = len(BASE) - 32 - len(payload)
    assert payload_start % 16 == 0 and payload_start - (16 + length) < 16
    assert BASE[16 + length:payload_start] == bytes(payload_start - 16 - length)
    assert header["format"] == "TernarySegmentation model"
    assert header["format_version"] == header["ops_version"] == 1
    for name, entry in header["tensors"].items():
        assert entry["offset"] % 16 == 0
        dtype, count = entry["dtype"], int(np.prod(entry["shape"]))
        assert entry["nbytes"] == (-(-count // 4) if dtype == "ternary2" else 4 * count)
        raw = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
        expected = every_op_model()["tensors"][name]
        if dtype == "float32":
            assert np.array_equal(np.frombuffer(raw, "<f4").reshape(expected.shape), expected)
        elif dtype == "int32":
            assert np.array_equal(np.frombuffer(raw, "<i4").reshape(expected.shape), expected)
        else:
            assert expected.dtype == np.int8
            assert raw == MF.encode_ternary2(expected)
    assert hashlib.sha256(BASE[:-32]).digest() == BASE[-32:]


def test_ternary2_bit_layout():
    # value i at bits 2*(i%4) of byte i//4; 0 -> 0, +1 -> 1, -1 -> 2
    values = np.array([0, 1, -1, 0, 1], np.int8)
    assert MF.encode_ternary2(values) == bytes([(1 << 2) | (2 << 4), 1])
    assert MF.encode_ternary2(np.array([-1, -1, -1, -1], np.int8)) == bytes([0b10101010])
    assert np.array_equal(MF.decode_ternary2(bytes([(1 << 2) | (2 << 4), 1]), (5,)), values)


@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (7, 3), (2, 3, 3, 3, 3), (9, 5, 1, 3, 5)])
def test_ternary2_round_trip(shape):
    a = rng_for(shape).integers(-1, 2, shape).astype(np.int8)
    b = MF.encode_ternary2(a)
    assert len(b) == -(-a.size // 4)
    out = MF.decode_ternary2(b, shape)
    assert out.dtype == np.int8 and np.array_equal(out, a)


def test_ternary2_rejects_bad_data():
    with pytest.raises(ModelFileError, match="invalid ternary2 code 3"):
        MF.decode_ternary2(bytes([0b00110000]), (3,))
    with pytest.raises(ModelFileError, match="unused bits"):
        MF.decode_ternary2(bytes([0b01000000]), (3,))
    with pytest.raises(ModelFileError, match="needs 2 bytes"):
        MF.decode_ternary2(bytes(1), (5,))
    with pytest.raises(ValueError, match="in {-1, 0, \\+1}"):
        MF.encode_ternary2(np.array([0, 2], np.int8))
    with pytest.raises(ValueError, match="integers"):
        MF.encode_ternary2(np.array([0.0, 1.0]))


def test_unknown_top_level_and_metadata_keys_are_allowed():
    header = copy.deepcopy(BASE_HEADER)
    header["future_optional_key"] = {"anything": [1, 2]}
    header["metadata"]["license"] = "CC-BY-4.0"
    header["metadata"]["dataset_cases"] = 82
    model = read_model(assemble(header, BASE_PAYLOAD))
    assert model.metadata["license"] == "CC-BY-4.0"


def test_model_sizes():
    model = read_model(BASE)
    sizes = MF.model_sizes(model)
    assert set(sizes) == {"file_bytes", "fp32_bytes", "ternary_layers_bytes", "ternary_layers_fp32_bytes",
                          "ratio"}
    assert sizes["file_bytes"] == len(BASE)
    assert sizes["fp32_bytes"] == sum(4 * a.size for a in every_op_model()["tensors"].values())
    assert 0 < sizes["ratio"] <= 0.1
    assert sizes["ratio"] == sizes["ternary_layers_bytes"] / sizes["ternary_layers_fp32_bytes"]


# ------------------------------------------------------------------------------------ the writer

def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "model.tsm"
    path.write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_model(path, **every_op_model())
    assert path.read_bytes() == b"a user's file"
    assert os.listdir(tmp_path) == ["model.tsm"]
    write_model(path, overwrite=True, **every_op_model())
    assert path.read_bytes() == BASE


def test_write_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "model.tsm"
    real_encode = MF.encode_model

    def encode_then_someone_writes(**kwargs):
        data = real_encode(**kwargs)
        path.write_bytes(b"made by someone else")  # between the first check and the publish
        return data

    monkeypatch.setattr(MF, "encode_model", encode_then_someone_writes)
    with pytest.raises(FileExistsError):
        write_model(path, **every_op_model())
    assert path.read_bytes() == b"made by someone else"
    assert os.listdir(tmp_path) == ["model.tsm"]


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "model.tsm"
    assert write_model(path, **every_op_model()) == len(BASE)
    assert os.listdir(tmp_path) == ["model.tsm"]
    # a failure while moving into place: the old file stays whole, the temporary file is gone
    def failing_replace(src, dst):
        raise OSError("disk on fire")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_model(path, overwrite=True, **every_op_model(seed=1))
    assert os.listdir(tmp_path) == ["model.tsm"]
    assert path.read_bytes() == BASE


def test_write_validates_before_writing(tmp_path):
    path = tmp_path / "model.tsm"
    cases = []
    kwargs = every_op_model()
    kwargs["tensors"]["c1.weight"] = kwargs["tensors"]["c1.weight"][:, :4].copy()
    cases.append((kwargs, "node 'c1': weight has shape (8, 4, 3, 3, 3), expected (8, 8, 3, 3, 3)"))
    kwargs = every_op_model()
    kwargs["tensors"]["cls.bias"] = kwargs["tensors"]["cls.bias"].astype(np.float64)
    cases.append((kwargs, "tensor 'cls.bias' has dtype float64"))
    kwargs = every_op_model()
    kwargs["tensors"]["cls.weight"][0, 0] = np.nan
    cases.append((kwargs, "tensor 'cls.weight': 1 non-finite value"))
    kwargs = every_op_model()
    kwargs["tensors"]["c1.weight"][0, 0, 0, 0, 0] = 2
    cases.append((kwargs, "tensor 'c1.weight': ternary2 values must be in"))
    kwargs = every_op_model()
    kwargs["metadata"]["validation_dice"] = float("nan")
    cases.append((kwargs, "cannot be written as JSON"))
    kwargs = every_op_model()
    kwargs["metadata"]["extra"] = object()
    cases.append((kwargs, "cannot be written as JSON"))
    kwargs = every_op_model()
    del kwargs["tensors"]["cls.bias"]
    cases.append((kwargs, "bias tensor 'cls.bias' is not in the tensor table"))
    for kwargs, message in cases:
        with pytest.raises(ModelFileError) as info:
            write_model(path, **kwargs)
        assert message in str(info.value)
        assert os.listdir(tmp_path) == []


def test_writer_accepts_numpy_scalars_and_tuples():
    kwargs = every_op_model()
    kwargs["graph"][1]["kernel"] = (np.int64(3),) * 3
    kwargs["metadata"]["validation_dice"] = np.float32(0.75)
    kwargs["classes"] = tuple(CLASSES)
    model = read_model(MF.encode_model(**kwargs))
    assert model.graph[1]["kernel"] == [3, 3, 3]
    assert model.metadata["validation_dice"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------ binary errors

def test_wrong_magic():
    raises(b"PK\x03\x04" + BASE[4:], "not a TernarySegmentation model file")
    raises(b"\x89HDF\r\n\x1a\n" + bytes(100), "not a TernarySegmentation model file")


def test_empty_file(tmp_path):
    raises(b"", "empty")
    (tmp_path / "empty").write_bytes(b"")
    raises(tmp_path / "empty", "empty", "'" + str(tmp_path / "empty") + "'")


def test_unsupported_version():
    data = BASE[:8] + struct.pack("<I", 2) + BASE[12:]
    message = raises(data)
    assert message == "unsupported model format version 2; this engine reads version 1"
    raises(with_checksum(data), "unsupported model format version 2")


@pytest.mark.parametrize("length", [0, 2**20 + 1, 2**32 - 1])
def test_header_length_out_of_range(length):
    raises(BASE[:12] + struct.pack("<I", length) + BASE[16:], f"header length {length} is out of range")


def test_header_length_beyond_the_file():
    raises(BASE[:12] + struct.pack("<I", 2**20) + BASE[16:], "truncated file")


def test_file_bigger_than_max_bytes(tmp_path):
    raises_max = f"more than the limit of {len(BASE) - 1}"
    with pytest.raises(ModelFileError, match=raises_max):
        read_model(BASE, max_bytes=len(BASE) - 1)
    path = tmp_path / "model.tsm"
    path.write_bytes(BASE)
    with pytest.raises(ModelFileError, match=raises_max):
        read_model(path, max_bytes=len(BASE) - 1)
    assert read_model(path, max_bytes=len(BASE)).file_size == len(BASE)


def test_checksum_mismatch():
    start, _ = tensor_bytes("cls.weight")
    payload_start = len(BASE) - 32 - len(BASE_PAYLOAD)
    data = bytearray(BASE)
    data[payload_start + start] ^= 0x01
    raises(bytes(data), "checksum mismatch: the file is corrupted")
    data = bytearray(BASE)
    data[-1] ^= 0x80
    raises(bytes(data), "checksum mismatch")


def test_truncation_at_every_fiftieth():
    for k in range(50):
        cut = len(BASE) * k // 50
        message = raises(BASE[:cut])
        assert ("truncated" in message) or (cut == 0 and "empty" in message), (cut, message)


def test_appended_bytes_break_the_checksum():
    raises(BASE + bytes(16), "checksum mismatch")


def test_nonzero_padding_is_rejected():
    length = struct.unpack_from("<I", BASE, 12)[0]
    if (16 + length) % 16:
        data = bytearray(BASE)
        data[16 + length] = 0x20
        raises(with_checksum(data), "padding after the header must be zero")
    # a byte in the gap between two tensors
    ends = sorted(e["offset"] + e["nbytes"] for e in BASE_HEADER["tensors"].values())
    gap = next(end for end in ends if end % 16)
    payload = bytearray(BASE_PAYLOAD)
    payload[gap] = 1
    raises(assemble(BASE_HEADER, payload), f"payload bytes {gap}..", "must be zero padding")
    raises(assemble(BASE_HEADER, BASE_PAYLOAD + b"\x01" + bytes(15)), "after the last tensor")


def test_read_model_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="path or the file's bytes"):
        read_model(12)
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "missing.tsm")
    with pytest.raises(ValueError, match="max_bytes"):
        read_model(BASE, max_bytes=0)


# ------------------------------------------------------------------------------------ header errors

def _set(path, value):
    """A mutation setting header[path...] = value."""
    def mutate(h, p):
        target = h
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return h, p
    return mutate


def _delete(path):
    def mutate(h, p):
        target = h
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return h, p
    return mutate


def _node(name):
    return next(i for i, n in enumerate(BASE_HEADER["graph"]) if n["name"] == name)


def _raw(text):
    return lambda h, p: (text, p)


def _with_payload_bytes(tensor, value):
    def mutate(h, p):
        start, end = tensor_bytes(tensor)
        p = bytearray(p)
        p[start:end] = value * ((end - start) // len(value))
        return h, bytes(p)
    return mutate


def _extra_tensor(h, p):
    offset = len(p)
    h["tensors"]["spare"] = {"dtype": "float32", "shape": [4], "offset": offset, "nbytes": 16}
    return h, p + np.ones(4, "<f4").tobytes()


def _move(name, index):
    def mutate(h, p):
        node = h["graph"].pop(_node(name))
        h["graph"].insert(index, node)
        return h, p
    return mutate


def _insert_node(index, node):
    def mutate(h, p):
        h["graph"].insert(index, node)
        return h, p
    return mutate


def _both(*mutations):
    def mutate(h, p):
        for m in mutations:
            h, p = m(h, p)
        return h, p
    return mutate


C1, C2, C3, CAT, UP, CLS, POOL = (_node(n) for n in ("c1", "c2", "c3", "cat", "up", "cls", "pool"))

HEADER_ERRORS = [
    # JSON itself
    ("json-syntax", _raw('{"format": '), "the header is not valid JSON"),
    ("json-not-object", _raw("[1, 2]"), "the header must be a JSON object, got an array"),
    ("json-utf8", _raw(b'{"a": "\xff"}'), "the header is not valid UTF-8"),
    ("json-nan", lambda h, p: (json.dumps(h).replace('"validation_dice": null', '"validation_dice": NaN'), p),
     "NaN, which is not valid JSON"),
    ("json-overflow", lambda h, p: (json.dumps(h).replace('"validation_dice": null',
                                                           '"validation_dice": 1e999'), p), "overflows"),
    ("json-long-int", lambda h, p: (json.dumps(h).replace('"validation_dice": null',
                                                           '"validation_dice": ' + "9" * 5000), p), "digits"),
    ("json-duplicate-key", lambda h, p: ('{"format": 1, ' + json.dumps(h)[1:], p), "duplicate key 'format'"),
    ("json-deep", _raw("[" * 100000 + "]" * 100000), "not valid JSON"),
    # top level
    ("missing-graph", _delete(["graph"]), "header: missing required key 'graph'"),
    ("format-name", _set(["format"], "ONNX"), "header 'format' must be 'TernarySegmentation model'"),
    ("format-version", _set(["format_version"], 2), "header 'format_version' is an integer 2"),
    ("ops-version", _set(["ops_version"], 2), "unsupported ops version 2; this engine runs ops version 1"),
    ("ops-version-type", _set(["ops_version"], "1"), "unsupported ops version"),
    # metadata
    ("metadata-type", _set(["metadata"], []), "metadata must be a JSON object, got an array"),
    ("metadata-name", _delete(["metadata", "name"]), "metadata: missing required key 'name'"),
    ("metadata-name-empty", _set(["metadata", "name"], ""), "metadata.name must not be empty"),
    ("metadata-string", _set(["metadata", "description"], 3), "metadata.description must be a string"),
    ("dice-type", _set(["metadata", "validation_dice"], "high"),
     "validation_dice must be a number in [0, 1]"),
    ("dice-range", _set(["metadata", "validation_dice"], 1.5), "validation_dice must be a number in [0, 1]"),
    ("dice-bool", _set(["metadata", "validation_dice"], True), "validation_dice must be a number"),
    ("created", _set(["metadata", "created"], "yesterday"), "metadata.created must be an ISO 8601"),
    ("created-date", _set(["metadata", "created"], "2025-02-30"), "metadata.created must be an ISO 8601"),
    ("created-zone", _set(["metadata", "created"], "2025-02-03T10:00:00+25:00"), "ISO 8601"),
    # preprocessing
    ("hu-order", _set(["preprocessing", "hu_window"], [240, -100]),
     "hu_window must be [lo, hi] with lo < hi"),
    ("hu-type", _set(["preprocessing", "hu_window"], [-100, "240"]), "hu_window[1] must be a finite number"),
    ("hu-range", _set(["preprocessing", "hu_window"], [-1e6, 240]), "hu_window[0] must be within"),
    ("spacing-zero", _set(["preprocessing", "model_spacing_mm"], [1, 0, 1]),
     "model_spacing_mm[1] must be in (0, 20]"),
    ("spacing-large", _set(["preprocessing", "model_spacing_mm"], [1, 1, 25]),
     "model_spacing_mm[2] must be in (0, 20]"),
    ("spacing-length", _set(["preprocessing", "model_spacing_mm"], [1, 1]),
     "model_spacing_mm must have 3..3 items"),
    ("orientation", _set(["preprocessing", "orientation"], "RAS"), "orientation must be 'LPS'"),
    ("preprocessing-key", _set(["preprocessing", "resample"], "cubic"),
     "preprocessing: unknown key 'resample'"),
    # classes
    ("classes-unique", _set(["classes"], ["background", "background"]), "classes must be unique"),
    ("classes-few", _set(["classes"], ["pancreas"]), "classes must have 2..256 items, got 1"),
    ("classes-type", _set(["classes"], ["background", 1]), "classes[1] must be a string"),
    ("classes-count", _set(["classes"], ["background", "pancreas", "tumour"]),
     "node 'cls': classes is 2 but the header lists 3 classes"),
    # tensor table
    ("tensors-type", _set(["tensors"], []), "tensors must be a JSON object"),
    ("tensor-dtype", _set(["tensors", "cls.bias", "dtype"], "float16"),
     "tensor 'cls.bias': dtype must be one of"),
    ("tensor-nbytes", _set(["tensors", "cls.bias", "nbytes"], 12),
     "tensor 'cls.bias': nbytes is 12, but float32 of shape [2] takes 8"),
    ("tensor-align",
     _set(["tensors", "cls.bias", "offset"], BASE_HEADER["tensors"]["cls.bias"]["offset"] + 4),
     "is not a multiple of 16"),
    ("tensor-outside", _set(["tensors", "cls.bias", "offset"], len(BASE_PAYLOAD)), "lie outside the payload"),
    ("tensor-negative", _set(["tensors", "cls.bias", "offset"], -16), "offset must be in 0.."),
    ("tensor-overlap",
     _set(["tensors", "cls.bias", "offset"], BASE_HEADER["tensors"]["cls.weight"]["offset"]),
     "overlap"),
    ("tensor-elements", _set(["tensors", "c1.weight", "shape"], [4096, 4096, 8]),
     "has 134217728 elements, more than the limit of 67108864"),
    ("tensor-shape-bool", _set(["tensors", "cls.bias", "shape"], [True, 2]),
     "shape[0] must be an integer, got a boolean"),
    ("tensor-shape-zero", _set(["tensors", "cls.bias", "shape"], [0]), "shape[0] must be in 1.."),
    ("tensor-shape-empty", _set(["tensors", "cls.bias", "shape"], []), "shape must have 1..8 items"),
    ("tensor-key", _set(["tensors", "cls.bias", "scale"], 1.0), "tensor 'cls.bias': unknown key 'scale'"),
    ("tensor-name-empty",
     lambda h, p: (dict(h, tensors=dict(h["tensors"], **{"": h["tensors"]["cls.bias"]})), p),
     "tensor name must not be empty"),
    ("tensor-unused", _extra_tensor, "tensor 'spare' is not used by any node"),
    ("tensor-nan", _with_payload_bytes("cls.weight", np.array([np.nan], "<f4").tobytes()),
     "tensor 'cls.weight': 16 non-finite value(s)"),
    ("tensor-inf", _with_payload_bytes("c0.bias", np.array([np.inf], "<f4").tobytes()), "non-finite"),
    ("tensor-ternary-code", _with_payload_bytes("c1.weight", b"\xff"),
     "tensor 'c1.weight': invalid ternary2 code 3"),
    # graph structure
    ("graph-empty", _set(["graph"], []), "graph must have 1..4096 items, got 0"),
    ("graph-node-type", _set(["graph", 0], "conv"), "graph[0] must be a JSON object, got a string"),
    ("node-name-missing", _delete(["graph", C1, "name"]), f"graph[{C1}]: missing required key 'name'"),
    ("node-op", _set(["graph", C1, "op"], "conv2d"), "node 'c1': unknown op \"conv2d\""),
    ("node-duplicate", _set(["graph", C2, "name"], "c1"),
     "node 'c1': the name is already used by an earlier node"),
    ("node-image", _set(["graph", C1, "name"], "image"),
     "node 'image': the name is already used by the graph input"),
    ("node-key", _set(["graph", C1, "groups"], 2), "node 'c1': unknown key 'groups'"),
    ("input-undefined", _set(["graph", C1, "inputs"], ["nope"]), "node 'c1': input 'nope' is not defined"),
    ("input-later", _set(["graph", C1, "inputs"], ["c2"]), "input 'c2' is defined after this node"),
    ("input-count", _set(["graph", CAT, "inputs"], ["c1", "up", "c1"]),
     "node 'cat': inputs must have 2..2 items"),
    ("input-type", _set(["graph", C1, "inputs"], [7]), "node 'c1': inputs[0] must be a string"),
    ("classifier-not-last", _move("cls", len(BASE_HEADER["graph"]) - 2),
     "node 'cls': the classifier must be the last node"),
    ("no-classifier", lambda h, p: (dict(h, graph=h["graph"][:-1]), p),
     "the last node must be the classifier, got op 'ternary_conv3d'"),
    ("dead-node", _insert_node(CLS, {"name": "dead", "op": "max_pool", "inputs": ["c3"]}),
     "node 'dead': its output is never used"),
    ("pool-tensors", _set(["graph", POOL, "tensors"], {"weight": "c1.weight"}),
     "node 'pool': op 'max_pool' takes no tensors"),
    # attributes
    ("in-channels", _set(["graph", C2, "in_channels"], 24),
     "node 'c2': in_channels is 24 but its input 'pool' has 8 channel(s)"),
    ("out-channels", _set(["graph", C1, "out_channels"], 9),
     "node 'c1': weight has shape (8, 8, 3, 3, 3), expected (9, 8, 3, 3, 3) from out_channels 9, "
     "in_channels 8"),
    ("channels-type", _set(["graph", C1, "in_channels"], "8"),
     "node 'c1': in_channels must be an integer, got a string"),
    ("channels-bool", _set(["graph", C1, "in_channels"], True),
     "in_channels must be an integer, got a boolean"),
    ("channels-zero", _set(["graph", C1, "out_channels"], 0), "out_channels must be in 1..4096"),
    ("kernel-even", _set(["graph", C1, "kernel"], [3, 2, 3]), "node 'c1': kernel sizes must be odd"),
    ("kernel-large", _set(["graph", C1, "kernel"], [3, 3, 17]), "node 'c1': kernel[2] must be in 1..15"),
    ("kernel-float", _set(["graph", C1, "kernel"], [3, 3.0, 3]),
     "kernel[1] must be an integer, got a number"),
    ("kernel-length", _set(["graph", C1, "kernel"], [3, 3]), "node 'c1': kernel must have 3..3 items"),
    ("stride", _set(["graph", C1, "stride"], [5, 1, 1]), "node 'c1': stride[0] must be in 1..4"),
    ("dilation", _set(["graph", C1, "dilation"], [1, 0, 1]), "node 'c1': dilation[1] must be in 1..8"),
    ("attr-missing", _delete(["graph", C1, "dilation"]), "node 'c1': missing required key 'dilation'"),
    ("classifier-classes", _set(["graph", CLS, "classes"], 3),
     "node 'cls': classes is 3 but the header lists 2"),
    # tensors of nodes
    ("role-missing", _delete(["graph", C1, "tensors", "hi"]),
     "node 'c1': tensors: missing required key 'hi'"),
    ("role-extra", _set(["graph", C1, "tensors", "scale"], "cls.bias"),
     "node 'c1': tensors: unknown key 'scale'"),
    ("role-absent", _set(["graph", C1, "tensors", "hi"], "nope"),
     "node 'c1': hi tensor 'nope' is not in the tensor table"),
    ("role-dtype", _set(["tensors", "c1.lo", "dtype"], "float32"),
     "node 'c1': lo 'c1.lo' has dtype float32, expected int32"),
    ("role-shared", _set(["graph", C2, "tensors", "lo"], "c1.lo"),
     "node 'c2': tensor 'c1.lo' is already used by node 'c1'"),
    ("weight-ternary-as-float", _set(["tensors", "c1.weight", "dtype"], "float32"), "nbytes is"),
    ("classifier-weight-shape", _both(_set(["tensors", "cls.weight", "shape"], [8, 2])),
     "node 'cls': weight has shape (8, 2), expected (2, 8)"),
    # kinds and resolutions
    ("pool-image", _set(["graph", POOL, "inputs"], ["image"]),
     "node 'pool': max_pool needs a ternary map, but input 'image' is the float image"),
    ("ternary-conv-image",
     _both(_set(["graph", C1, "inputs"], ["image"]), _set(["graph", C1, "in_channels"], 1)),
     "node 'c1': ternary_conv3d needs a ternary map, but input 'image' is the float image"),
    ("upsample-resolution", _set(["graph", UP, "inputs"], ["c2", "pool"]),
     "node 'up': upsample doubles the resolution, so input 'c2'"),
    ("concat-resolution", _set(["graph", CAT, "inputs"], ["c1", "c2"]),
     "node 'cat': concat needs inputs of the same resolution"),
    ("classifier-resolution",
     _both(_set(["graph", CLS, "inputs"], ["c2"]), _set(["graph", CLS, "in_channels"], 16)),
     "node 'cls': the classifier input must be at the input resolution"),
]


@pytest.mark.parametrize("name, mutate, message", HEADER_ERRORS, ids=[c[0] for c in HEADER_ERRORS])
def test_header_validation_errors(name, mutate, message):
    header, payload = mutate(copy.deepcopy(BASE_HEADER), BASE_PAYLOAD)
    got = raises(assemble(header, payload), message)
    assert not got.startswith(MF._UNEXPECTED), got


def test_float_conv_from_a_ternary_map_is_rejected():
    header = copy.deepcopy(BASE_HEADER)
    node = copy.deepcopy(header["graph"][0])
    node.update(name="c0b", inputs=["c1"], in_channels=8)
    header["graph"].insert(C1 + 1, node)
    raises(assemble(header, BASE_PAYLOAD), "node 'c0b': float_conv3d reads the float image, but input 'c1'")


# ------------------------------------------------------------------------------------ fuzz

VALUE_POOL = [None, True, False, 0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 24, 2**31, -2**31, 2**63, 1e308, -0.5, 0.5,
              "", "x", "image", "c1", "cls", "c1.weight", "cls.bias", "float32", "ternary2", "int32",
              "classifier", "max_pool", "concat", "upsample", "LPS", [], {}, [3, 3, 3], [1, 1, 1], [2, 2, 2],
              [0], [3], [[3]], ["c1"], ["c1", "c1"], ["image"], {"weight": "c1.weight"}, {"a": 1}]


def _paths(obj, prefix=()):
    """Every (container path, key) in a JSON value."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _mutate_json(rng, header):
    """1-3 random edits of a header: a value replaced (from the pool or another place), deleted, a key
    added, list items swapped or duplicated, an integer nudged."""
    h = copy.deepcopy(header)
    for _ in range(int(rng.integers(1, 4))):
        paths = list(_paths(h))
        path = paths[int(rng.integers(len(paths)))]
        parent, key = _get(h, path[:-1]), path[-1]
        action = int(rng.integers(7))
        if action == 0:
            parent[key] = copy.deepcopy(VALUE_POOL[int(rng.integers(len(VALUE_POOL)))])
        elif action == 1:
            parent[key] = copy.deepcopy(_get(h, paths[int(rng.integers(len(paths)))]))
        elif action == 2:
            del parent[key]
        elif action == 3 and isinstance(parent, dict):
            new = VALUE_POOL[int(rng.integers(len(VALUE_POOL)))]
            parent["k" + str(int(rng.integers(5)))] = copy.deepcopy(new)
        elif action == 4 and isinstance(parent, list) and len(parent) > 1:
            j = int(rng.integers(len(parent)))
            parent[key], parent[j] = parent[j], parent[key]
        elif action == 5 and isinstance(parent, list):
            parent.insert(int(rng.integers(len(parent) + 1)), copy.deepcopy(parent[key]))
        elif isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += int(rng.choice([-16, -1, 1, 2, 16]))
    return h


def _mutate_bytes(rng, data, header_region):
    """Random byte flips, insertions, deletions, truncations or duplicated chunks, half of them aimed
    at the header."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        hi = header_region if rng.random() < 0.5 else len(data)
        pos = int(rng.integers(0, max(1, min(hi, len(data)))))
        action = int(rng.integers(5))
        if action == 0:
            for _ in range(int(rng.integers(1, 9))):
                p = min(len(data) - 1, pos + int(rng.integers(0, 64)))
                if p >= 0:
                    data[p] ^= int(rng.integers(1, 256))
        elif action == 1:
            data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 40))).astype(np.uint8).tobytes()
        elif action == 2:
            del data[pos:pos + int(rng.integers(1, 40))]
        elif action == 3:
            del data[pos:]
        else:
            data[pos:pos] = data[pos:pos + int(rng.integers(1, 64))]
    return bytes(data)


def test_fuzz_reader_raises_only_model_file_errors():
    from TernarySegmentationLib import reference
    from TernarySegmentationLib.network import TernaryNetwork

    rng = np.random.default_rng(20250131)
    header_end = 16 + struct.unpack_from("<I", BASE, 12)[0]
    image = rng.normal(0, 1, (5, 6, 7)).astype(np.float32)
    deadline = time.monotonic() + 15.0
    counts = {"cases": 0, "accepted": 0, "rejected": 0, "ran": 0}
    while counts["cases"] < 10000 and time.monotonic() < deadline:
        i = counts["cases"]
        kind = i % 4
        if kind == 0:    # raw mutations: mostly the checksum catches them
            data = _mutate_bytes(rng, BASE, header_end)
        elif kind == 1:  # raw mutations, checksum recomputed so they reach the JSON and tensor checks
            data = _mutate_bytes(rng, BASE, header_end)
            if len(data) >= 32:
                data = with_checksum(data)
        else:            # JSON edits, re-serialised into a well-formed file
            header = _mutate_json(rng, BASE_HEADER)
            data = assemble(header, BASE_PAYLOAD)
        counts["cases"] += 1
        try:
            model = read_model(data)
        except ModelFileError as error:
            counts["rejected"] += 1
            assert not str(error).startswith(MF._UNEXPECTED), f"case {i}: validation gap: {error}"
            continue
        except Exception as error:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"case {i} (kind {kind}): {type(error).__name__} instead of ModelFileError: {error}")
        counts["accepted"] += 1
        # an accepted file must also run: validation is enough for the executor
        if list(model.graph) != BASE_HEADER["graph"] and counts["ran"] < 40:
            logits = TernaryNetwork(model).forward(image, ops=reference)
            assert logits.shape == (5, 6, 7, len(model.classes))
            counts["ran"] += 1
    assert counts["cases"] >= 3000, f"the fuzz ran only {counts} in 15 s"
    assert counts["rejected"] > counts["cases"] // 2
    print(f"fuzz: {counts}")
