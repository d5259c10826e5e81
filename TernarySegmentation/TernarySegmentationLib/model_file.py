"""The single-file packed model format, version 1: reader, writer and validation.

The layout, header keys, dtypes, graph ops and validation rules are specified in
docs/model-format.md. In short: magic, version, header length, a UTF-8 JSON header, a payload of
16-byte aligned tensors (ternary weights 2 bits each), and a SHA-256 trailer over everything before it.

A model file is untrusted input. The reader never unpickles or evaluates anything, checks every size
against the real file length before it allocates, and raises ``ModelFileError`` (a ValueError) whose
message says what is wrong and where for any malformed file. The writer builds the file in memory and
runs the reader's own validation on it before writing it atomically, so a file it writes always reads.
"""

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from . import _atomic

MAGIC = b"TSEGMDL\0"
FORMAT_VERSION = 1
OPS_VERSION = 1
FORMAT_NAME = "TernarySegmentation model"
ALIGNMENT = 16                   # header padding and tensor offsets
PREAMBLE_BYTES = 16              # magic, format version, header length
CHECKSUM_BYTES = 32              # SHA-256 trailer
MAX_HEADER_BYTES = 2**20
DEFAULT_MAX_BYTES = 256 * 2**20
MAX_ELEMENTS = 64 * 2**20        # per tensor
MAX_TENSOR_NDIM = 8
MAX_TENSORS = 16384
MAX_NODES = 4096
MAX_NAME_LENGTH = 256
MAX_CHANNELS = 4096              # in/out channels of one layer
MAX_MAP_CHANNELS = 8192          # channels of any feature map (a concat of two layers)
MAX_CLASSES = 256
MAX_DOWNSAMPLING = 2**16         # per axis, product of strides and pools on the way to a map
MAX_HU = 100000.0
DTYPES = ("float32", "int32", "ternary2")
METADATA_STRINGS = ("name", "description", "variant", "training_data", "code_version", "intended_use")
GRAPH_INPUT = "image"

# op -> (number of inputs, attributes, tensor roles). Attribute ranges are checked in _check_node.
OPS = {
    "float_conv3d": (1, ("in_channels", "out_channels", "kernel", "stride", "dilation"),
                     ("weight", "bias", "lo", "hi")),
    "ternary_conv3d": (1, ("in_channels", "out_channels", "kernel", "stride", "dilation"),
                       ("weight", "lo", "hi")),
    "max_pool": (1, (), ()),
    "upsample": (2, (), ()),
    "concat": (2, (), ()),
    "classifier": (1, ("in_channels", "classes"), ("weight", "bias")),
}
_TRIPLE_RANGES = {"kernel": (1, 15), "stride": (1, 4), "dilation": (1, 8)}
_UNEXPECTED = "malformed model file"  # prefix of the last-resort wrapper in _parse


class ModelFileError(ValueError):
    """A model file (or a model given to the writer) is malformed; the message says what and where."""


@dataclass(frozen=True, eq=False)
class Model:
    """A validated model file. ``tensors`` holds read-only arrays: ternary2 decoded to int8 in
    {-1, 0, +1}, float32 and int32 in native byte order. ``graph`` is the tuple of node dicts in
    execution order (validated: see docs/model-format.md)."""

    metadata: dict
    preprocessing: dict
    classes: tuple
    graph: tuple
    tensors: dict
    file_size: int
    sha256: str


# ------------------------------------------------------------------------------------ ternary2

def encode_ternary2(a):
    """Integer array in {-1, 0, +1} -> ternary2 bytes: value i at bits 2*(i%4) of byte i//4 (C order),
    codes 0 -> 0, 1 -> +1, 2 -> -1; the unused bits of the last byte are 0."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"ternary2 values must be integers in {{-1, 0, +1}}, got dtype {a.dtype}")
    flat = a.reshape(-1)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"ternary2 values must be in {{-1, 0, +1}}, got range [{flat.min()}, {flat.max()}]")
    codes = np.zeros(4 * (-(-flat.size // 4)), np.uint8)
    codes[:flat.size] = np.where(flat < 0, 2, flat)
    q = codes.reshape(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).astype(np.uint8).tobytes()


def decode_ternary2(b, shape):
    """ternary2 bytes -> int8 array of ``shape`` in {-1, 0, +1}. Raises ModelFileError on a wrong
    length, the invalid code 3, or nonzero bits after the last value."""
    shape = tuple(int(n) for n in shape)
    count = math.prod(shape)
    raw = np.frombuffer(b, np.uint8)
    if raw.size != -(-count // 4):
        raise ModelFileError(f"ternary2 data of shape {shape} needs {-(-count // 4)} bytes, got {raw.size}")
    codes = np.empty((raw.size, 4), np.uint8)
    for i in range(4):
        codes[:, i] = (raw >> (2 * i)) & 3
    codes = codes.reshape(-1)
    invalid = np.flatnonzero(codes[:count] == 3)
    if invalid.size:
        raise ModelFileError(f"invalid ternary2 code 3 (allowed: 0, 1, 2) at {invalid.size} element(s), "
                             f"first at flat index {invalid[0]}")
    if codes[count:].any():
        raise ModelFileError("the unused bits after the last ternary2 value must be zero")
    lut = np.array([0, 1, -1, 0], np.int8)
    return lut[codes[:count]].reshape(shape)


def _stored_nbytes(dtype, count):
    return -(-count // 4) if dtype == "ternary2" else 4 * count


def _align(n):
    return -(-n // ALIGNMENT) * ALIGNMENT


# ------------------------------------------------------------------------------------ reading

def read_model(source, max_bytes=DEFAULT_MAX_BYTES):
    """Read and validate a model file. ``source``: a path (str or os.PathLike) or the file's bytes.

    Raises ModelFileError for any malformed file (larger than ``max_bytes`` included); OSError if a
    path cannot be read; TypeError for a source of another type.
    """
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    max_bytes = int(max_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ModelFileError(f"the file has {len(data)} bytes, more than the limit of {max_bytes} "
                                 "(max_bytes)")
        # A private, aligned copy: tensors are views of it (16-byte aligned, read-only).
        return _parse(np.frombuffer(data, np.uint8).copy())
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            return _parse(_read_file(path, max_bytes))
        except ModelFileError as error:
            raise ModelFileError(f"model file {path!r}: {error}") from None
    raise TypeError(f"source must be a path or the file's bytes, got {type(source).__name__}")


def _read_file(path, max_bytes):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:  # before allocating anything
            raise ModelFileError(f"the file has {size} bytes, more than the limit of {max_bytes} (max_bytes)")
        buffer = np.empty(size, np.uint8)
        view, filled = memoryview(buffer), 0
        while filled < size:
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
    return buffer[:filled]


def _parse(buffer):
    """uint8 array holding a whole file -> Model; every failure is a ModelFileError."""
    try:
        return _parse_unguarded(buffer)
    except ModelFileError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError, RecursionError,
            struct.error) as error:
        # Last resort: every check is explicit above, this only keeps the reader's promise.
        raise ModelFileError(f"{_UNEXPECTED} ({type(error).__name__}: {error})") from error


def _parse_unguarded(buffer):
    n = buffer.size
    buffer.flags.writeable = False
    if n == 0:
        raise ModelFileError("the file is empty")
    head = bytes(buffer[:PREAMBLE_BYTES])
    if head[:8] != MAGIC[:len(head[:8])]:
        raise ModelFileError(f"not a TernarySegmentation model file: it starts with {head[:8]!r}, "
                             f"expected {MAGIC!r}")
    if n < PREAMBLE_BYTES:
        raise ModelFileError(f"truncated file: {n} bytes, shorter than the {PREAMBLE_BYTES}-byte preamble")
    version, header_length = struct.unpack_from("<II", head, 8)
    if version != FORMAT_VERSION:
        raise ModelFileError(f"unsupported model format version {version}; this engine reads version "
                             f"{FORMAT_VERSION}")
    if not 1 <= header_length <= MAX_HEADER_BYTES:
        raise ModelFileError(f"header length {header_length} is out of range 1..{MAX_HEADER_BYTES}")
    payload_start = _align(PREAMBLE_BYTES + header_length)
    if n < payload_start + CHECKSUM_BYTES:
        raise ModelFileError(f"truncated file: {n} bytes, but the header (length {header_length}), its "
                             f"padding and the checksum need {payload_start + CHECKSUM_BYTES}")
    body_end = n - CHECKSUM_BYTES
    digest = hashlib.sha256(buffer[:body_end]).digest()
    if digest != bytes(buffer[body_end:]):
        needed = _size_the_table_needs(buffer, header_length, payload_start)
        if needed is not None and n < needed:
            raise ModelFileError(f"truncated file: {n} bytes, but its tensor table needs at least {needed} "
                                 "(checksum mismatch)")
        raise ModelFileError("checksum mismatch: the file is corrupted (the SHA-256 of its first "
                             f"{body_end} bytes differs from the one stored in its last 32 bytes)")
    header = _parse_json(bytes(buffer[PREAMBLE_BYTES:PREAMBLE_BYTES + header_length]))
    if buffer[PREAMBLE_BYTES + header_length:payload_start].any():
        raise ModelFileError("the padding after the header must be zero bytes")
    payload = buffer[payload_start:body_end]
    payload.flags.writeable = False
    metadata, preprocessing, classes, table, graph = _check_header(header, payload.size)
    _check_payload_gaps(table, payload)
    tensors = {name: _decode_tensor(name, entry, payload) for name, entry in table.items()}
    return Model(metadata=metadata, preprocessing=preprocessing, classes=classes, graph=graph,
                 tensors=tensors, file_size=n, sha256=digest.hex())


def _size_the_table_needs(buffer, header_length, payload_start):
    """Best effort, for the message only: the file size the header's tensor table implies."""
    try:
        header = json.loads(bytes(buffer[PREAMBLE_BYTES:PREAMBLE_BYTES + header_length]).decode("utf-8"),
                            parse_int=_json_int)
        ends = [e["offset"] + e["nbytes"] for e in header["tensors"].values()]
        if not ends or not all(type(v) is int and 0 <= v <= 2**40 for v in ends):
            return None
        return payload_start + max(ends) + CHECKSUM_BYTES
    except Exception:  # noqa: BLE001 -- anything malformed just means "no hint"
        return None


def _parse_json(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelFileError(f"the header is not valid UTF-8 (byte {error.start}: {error.reason})") from None
    try:
        header = json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant,
                            parse_float=_json_float, parse_int=_json_int)
    except ModelFileError:
        raise
    except json.JSONDecodeError as error:
        raise ModelFileError(f"the header is not valid JSON: {error.msg} at line {error.lineno} column "
                             f"{error.colno}") from None
    except (ValueError, RecursionError) as error:
        raise ModelFileError(f"the header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"the header must be a JSON object, got {_json_type(header)}")
    return header


def _json_object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ModelFileError(f"the header has a duplicate key {key!r} in one object")
        obj[key] = value
    return obj


def _json_constant(name):
    raise ModelFileError(f"the header contains {name}, which is not valid JSON (numbers must be finite)")


def _json_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ModelFileError(f"the header contains the number {text[:40]}, which overflows a double")
    return value


def _json_int(text):
    if len(text) > 40:
        raise ModelFileError(f"the header contains an integer with {len(text)} digits (at most 40)")
    return int(text)


def _json_type(value):
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------ header checks

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(obj, key, where):
    if key not in obj:
        raise ModelFileError(f"{where}: missing required key {key!r}")
    return obj[key]


def _check_dict(value, where):
    if not isinstance(value, dict):
        raise ModelFileError(f"{where} must be a JSON object, got {_json_type(value)}")
    return value


def _check_list(value, where, minimum=0, maximum=None):
    if not isinstance(value, list):
        raise ModelFileError(f"{where} must be a JSON array, got {_json_type(value)}")
    if len(value) < minimum or (maximum is not None and len(value) > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise ModelFileError(f"{where} must have {bound} items, got {len(value)}")
    return value


def _check_string(value, where, allow_empty=True, max_length=None):
    if not isinstance(value, str):
        raise ModelFileError(f"{where} must be a string, got {_json_type(value)}")
    if not allow_empty and not value:
        raise ModelFileError(f"{where} must not be empty")
    if max_length is not None and len(value) > max_length:
        raise ModelFileError(f"{where} is longer than {max_length} characters")
    return value


def _check_int(value, where, minimum, maximum):
    if not _is_int(value):
        raise ModelFileError(f"{where} must be an integer, got {_describe(value)}")
    if not minimum <= value <= maximum:
        raise ModelFileError(f"{where} must be in {minimum}..{maximum}, got {value}")
    return value


def _check_number(value, where):
    if not _is_number(value) or not math.isfinite(value):
        raise ModelFileError(f"{where} must be a finite number, got {_describe(value)}")
    return value


def _check_keys(obj, where, required, optional=()):
    for key in required:
        _require(obj, key, where)
    unknown = [k for k in obj if k not in required and k not in optional]
    if unknown:
        raise ModelFileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(required + optional)})")


def _describe(value):
    """'an integer 3', 'a string "x"', 'an object': for messages."""
    short = _short(value)
    return f"{_json_type(value)} {short}" if short else _json_type(value)


def _short(value):
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else ""
    return text if len(text) <= 60 else text[:57] + "..."


def _check_header(header, payload_size):
    """Everything in the header; returns (metadata, preprocessing, classes, table, graph)."""
    for key in ("format", "format_version", "ops_version", "metadata", "preprocessing", "classes",
                "graph", "tensors"):
        _require(header, key, "header")
    # Unknown top-level keys are allowed: new optional keys may appear within a format version.
    if header["format"] != FORMAT_NAME:
        raise ModelFileError(f"header 'format' must be {FORMAT_NAME!r}, got {_describe(header['format'])}")
    if not _is_int(header["format_version"]) or header["format_version"] != FORMAT_VERSION:
        raise ModelFileError(f"header 'format_version' is {_describe(header['format_version'])}, but the "
                             f"file's version field is {FORMAT_VERSION}")
    if not _is_int(header["ops_version"]) or header["ops_version"] != OPS_VERSION:
        version = _short(header["ops_version"]) or "(not an integer)"
        raise ModelFileError(f"unsupported ops version {version}; this engine runs ops version {OPS_VERSION}")
    metadata = _check_metadata(header["metadata"])
    preprocessing = _check_preprocessing(header["preprocessing"])
    classes = _check_classes(header["classes"])
    table = _check_table(header["tensors"], payload_size)
    graph = _check_graph(header["graph"], table, classes)
    return metadata, preprocessing, classes, table, graph


_ISO_8601 = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,]\d{1,9})?)?"
                       r"(Z|[+-]\d{2}(?::?\d{2})?)?)?")


def _check_created(value, where):
    _check_string(value, where)
    match = _ISO_8601.fullmatch(value)
    try:
        if not match:
            raise ValueError
        y, mo, d, h, mi, s = (int(g) if g else 0 for g in match.groups()[:6])
        datetime(y, mo, d, h, mi, s)
        zone = match.group(7)
        if zone and zone != "Z" and (int(zone[1:3]) > 23 or int(zone[-2:] if len(zone) > 3 else 0) > 59):
            raise ValueError
    except ValueError:
        raise ModelFileError(f"{where} must be an ISO 8601 date or date-time such as "
                             f"'2025-01-31T12:00:00Z', got {_describe(value)}") from None
    return value


def _check_metadata(metadata):
    where = "metadata"
    _check_dict(metadata, where)
    for key in METADATA_STRINGS:
        _check_string(_require(metadata, key, where), f"{where}.{key}", allow_empty=key != "name")
    _check_created(_require(metadata, "created", where), f"{where}.created")
    dice = _require(metadata, "validation_dice", where)
    if dice is not None and not (_is_number(dice) and 0 <= dice <= 1):
        raise ModelFileError(f"{where}.validation_dice must be a number in [0, 1] or null, got "
                             f"{_describe(dice)}")
    return metadata  # extra keys are free-form


def _check_preprocessing(preprocessing):
    where = "preprocessing"
    _check_dict(preprocessing, where)
    # No unknown keys here: a key the reader ignored could change what the network sees.
    _check_keys(preprocessing, where, ("model_spacing_mm", "hu_window", "orientation"))
    spacing = _check_list(preprocessing["model_spacing_mm"], f"{where}.model_spacing_mm", 3, 3)
    for i, v in enumerate(spacing):
        _check_number(v, f"{where}.model_spacing_mm[{i}]")
        if not 0 < v <= 20:
            raise ModelFileError(f"{where}.model_spacing_mm[{i}] must be in (0, 20] mm, got {v}")
    window = _check_list(preprocessing["hu_window"], f"{where}.hu_window", 2, 2)
    for i, v in enumerate(window):
        _check_number(v, f"{where}.hu_window[{i}]")
        if abs(v) > MAX_HU:
            raise ModelFileError(f"{where}.hu_window[{i}] must be within +-{MAX_HU:g} HU, got {v}")
    if not window[0] < window[1]:
        raise ModelFileError(f"{where}.hu_window must be [lo, hi] with lo < hi, got {window}")
    if preprocessing["orientation"] != "LPS":
        raise ModelFileError(f"{where}.orientation must be 'LPS', got "
                             f"{_describe(preprocessing['orientation'])}")
    return preprocessing


def _check_classes(classes):
    _check_list(classes, "classes", 2, MAX_CLASSES)
    for i, name in enumerate(classes):
        _check_string(name, f"classes[{i}]", allow_empty=False, max_length=MAX_NAME_LENGTH)
    if len(set(classes)) != len(classes):
        duplicate = next(c for c in classes if classes.count(c) > 1)
        raise ModelFileError(f"classes must be unique, {duplicate!r} appears more than once")
    return tuple(classes)


def _check_table(table, payload_size):
    """The tensor table: names, dtypes, shapes, sizes, and a layout inside the payload."""
    _check_dict(table, "tensors")
    if len(table) > MAX_TENSORS:
        raise ModelFileError(f"tensors: {len(table)} entries, more than the limit of {MAX_TENSORS}")
    spans = []
    for name, entry in table.items():
        where = f"tensor {name!r}"
        _check_string(name, "tensor name", allow_empty=False, max_length=MAX_NAME_LENGTH)
        _check_dict(entry, where)
        _check_keys(entry, where, ("dtype", "shape", "offset", "nbytes"))
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise ModelFileError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {_describe(dtype)}")
        shape = _check_list(entry["shape"], f"{where}: shape", 1, MAX_TENSOR_NDIM)
        count = 1
        for i, n in enumerate(shape):
            count *= _check_int(n, f"{where}: shape[{i}]", 1, MAX_ELEMENTS)
        if count > MAX_ELEMENTS:
            raise ModelFileError(f"{where}: shape {shape} has {count} elements, more than the limit of "
                                 f"{MAX_ELEMENTS}")
        offset = _check_int(entry["offset"], f"{where}: offset", 0, 2**62)
        nbytes = _check_int(entry["nbytes"], f"{where}: nbytes", 1, 2**62)
        if nbytes != _stored_nbytes(dtype, count):
            raise ModelFileError(f"{where}: nbytes is {nbytes}, but {dtype} of shape {shape} takes "
                                 f"{_stored_nbytes(dtype, count)}")
        if offset % ALIGNMENT:
            raise ModelFileError(f"{where}: offset {offset} is not a multiple of {ALIGNMENT}")
        if offset + nbytes > payload_size:
            raise ModelFileError(f"{where}: bytes {offset}..{offset + nbytes} lie outside the payload "
                                 f"of {payload_size} bytes")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (start_a, end_a, a), (start_b, end_b, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelFileError(f"tensors {a!r} (bytes {start_a}..{end_a}) and {b!r} (bytes "
                                 f"{start_b}..{end_b}) overlap")
    return table


def _check_payload_gaps(table, payload):
    """Bytes of the payload that no tensor covers must be zero (padding only, nothing hidden)."""
    position = 0
    for start, end in sorted((e["offset"], e["offset"] + e["nbytes"]) for e in table.values()):
        if payload[position:start].any():
            raise ModelFileError(f"payload bytes {position}..{start} between tensors must be zero padding")
        position = end
    if payload[position:].any():
        raise ModelFileError(f"payload bytes {position}..{payload.size} after the last tensor must be zero "
                             "padding")


def _decode_tensor(name, entry, payload):
    shape = tuple(entry["shape"])
    raw = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
    if entry["dtype"] == "ternary2":
        try:
            array = decode_ternary2(raw, shape)
        except ModelFileError as error:
            raise ModelFileError(f"tensor {name!r}: {error}") from None
    else:
        little = raw.view("<f4" if entry["dtype"] == "float32" else "<i4").reshape(shape)
        array = little.astype(little.dtype.newbyteorder("="), copy=False)  # a view on little-endian CPUs
        if entry["dtype"] == "float32":
            bad = np.count_nonzero(~np.isfinite(array))
            if bad:
                raise ModelFileError(f"tensor {name!r}: {bad} non-finite value(s) (NaN or infinity); "
                                     "all float32 values must be finite")
    array.flags.writeable = False
    return array


# ------------------------------------------------------------------------------------ graph checks

class _Value:
    """What validation knows of a map: kind ('image' or 'ternary'), channels, and the per-axis
    downsampling factor f (its spatial size is ceil(n / f) for an input of size n)."""

    __slots__ = ("kind", "channels", "factor")

    def __init__(self, kind, channels, factor):
        self.kind, self.channels, self.factor = kind, channels, factor


def _check_graph(graph, table, classes):
    _check_list(graph, "graph", 1, MAX_NODES)
    values = {GRAPH_INPUT: _Value("image", 1, (1, 1, 1))}
    all_names = [n.get("name") if isinstance(n, dict) else None for n in graph]
    used_by = {}      # tensor name -> node that uses it
    consumed = set()  # values some node reads
    nodes = []
    for index, node in enumerate(graph):
        where = f"graph[{index}]"
        _check_dict(node, where)
        name = _check_string(_require(node, "name", where), f"{where}.name", allow_empty=False,
                             max_length=MAX_NAME_LENGTH)
        where = f"node {name!r}"
        if name in values:
            raise ModelFileError(f"{where}: the name is already used by "
                                 f"{'the graph input' if name == GRAPH_INPUT else 'an earlier node'}")
        op = _require(node, "op", where)
        if not isinstance(op, str) or op not in OPS:
            raise ModelFileError(f"{where}: unknown op {_short(op) or _json_type(op)} "
                                 f"(known: {', '.join(OPS)})")
        if op == "classifier" and index != len(graph) - 1:
            raise ModelFileError(f"{where}: the classifier must be the last node")
        n_inputs, attrs, roles = OPS[op]
        _check_keys(node, where, ("name", "op", "inputs") + attrs + (("tensors",) if roles else ()),
                    () if roles else ("tensors",))
        inputs = _check_list(node["inputs"], f"{where}: inputs", n_inputs, n_inputs)
        for i, source in enumerate(inputs):
            _check_string(source, f"{where}: inputs[{i}]")
            if source not in values:
                if source in all_names[index:]:
                    raise ModelFileError(f"{where}: input {source!r} is defined after this node (nodes "
                                         "must be in execution order)")
                raise ModelFileError(f"{where}: input {source!r} is not defined")
        consumed.update(inputs)
        if not roles and node.get("tensors", {}) != {}:
            raise ModelFileError(f"{where}: op {op!r} takes no tensors, got {_describe(node['tensors'])}")
        out = _check_node(node, op, where, [values[s] for s in inputs], table, used_by, classes)
        values[name] = out
        nodes.append(node)
    if graph[-1]["op"] != "classifier":
        raise ModelFileError(f"the last node must be the classifier, got op {graph[-1]['op']!r} "
                             f"(node {graph[-1]['name']!r})")
    for node in graph[:-1]:
        if node["name"] not in consumed:
            raise ModelFileError(f"node {node['name']!r}: its output is never used")
    for tensor in table:
        if tensor not in used_by:
            raise ModelFileError(f"tensor {tensor!r} is not used by any node")
    return tuple(nodes)


def _check_node(node, op, where, inputs, table, used_by, classes):
    """Attributes, input kinds, channels, resolution and tensors of one node; returns its output."""
    if op in ("float_conv3d", "ternary_conv3d"):
        (x,) = inputs
        if op == "float_conv3d" and x.kind != "image":
            raise ModelFileError(f"{where}: float_conv3d reads the float image, but input "
                                 f"{node['inputs'][0]!r} is a ternary map")
        if op == "ternary_conv3d":
            _check_ternary_input(x, where, node["inputs"][0], op)
        cin = _check_int(node["in_channels"], f"{where}: in_channels", 1, MAX_CHANNELS)
        cout = _check_int(node["out_channels"], f"{where}: out_channels", 1, MAX_CHANNELS)
        triples = {}
        for attr, (lo, hi) in _TRIPLE_RANGES.items():
            value = _check_list(node[attr], f"{where}: {attr}", 3, 3)
            for i, v in enumerate(value):
                _check_int(v, f"{where}: {attr}[{i}]", lo, hi)
            triples[attr] = tuple(value)
        if any(k % 2 == 0 for k in triples["kernel"]):
            raise ModelFileError(f"{where}: kernel sizes must be odd, got {list(triples['kernel'])}")
        if cin != x.channels:
            raise ModelFileError(f"{where}: in_channels is {cin} but its input {node['inputs'][0]!r} has "
                                 f"{x.channels} channel(s)")
        weight_dtype, vector_dtype = ("float32", "float32") if op == "float_conv3d" else ("ternary2", "int32")
        shapes = {"weight": ((cout, cin) + triples["kernel"], weight_dtype)}
        for role in OPS[op][2][1:]:
            shapes[role] = ((cout,), vector_dtype)
        _check_tensors(node, where, shapes, table, used_by,
                       f"from out_channels {cout}, in_channels {cin}, kernel {list(triples['kernel'])}")
        factor = tuple(f * s for f, s in zip(x.factor, triples["stride"]))
        return _Value("ternary", cout, _check_factor(factor, where))
    if op == "max_pool":
        (x,) = inputs
        _check_ternary_input(x, where, node["inputs"][0], op)
        return _Value("ternary", x.channels, _check_factor(tuple(2 * f for f in x.factor), where))
    if op == "upsample":
        x, like = inputs
        _check_ternary_input(x, where, node["inputs"][0], op)
        if x.factor != tuple(2 * f for f in like.factor):
            raise ModelFileError(
                f"{where}: upsample doubles the resolution, so input {node['inputs'][0]!r} (downsampled "
                f"by {list(x.factor)}) must be at half the resolution of {node['inputs'][1]!r} (downsampled "
                f"by {list(like.factor)})")
        return _Value("ternary", x.channels, like.factor)
    if op == "concat":
        a, b = inputs
        for value, source in zip(inputs, node["inputs"]):
            _check_ternary_input(value, where, source, op)
        if a.factor != b.factor:
            raise ModelFileError(f"{where}: concat needs inputs of the same resolution, got "
                                 f"{node['inputs'][0]!r} downsampled by {list(a.factor)} and "
                                 f"{node['inputs'][1]!r} by {list(b.factor)}")
        if a.channels + b.channels > MAX_MAP_CHANNELS:
            raise ModelFileError(f"{where}: {a.channels + b.channels} channels, more than the limit of "
                                 f"{MAX_MAP_CHANNELS}")
        return _Value("ternary", a.channels + b.channels, a.factor)
    # classifier
    (x,) = inputs
    _check_ternary_input(x, where, node["inputs"][0], op)
    cin = _check_int(node["in_channels"], f"{where}: in_channels", 1, MAX_MAP_CHANNELS)
    k = _check_int(node["classes"], f"{where}: classes", 2, MAX_CLASSES)
    if k != len(classes):
        raise ModelFileError(f"{where}: classes is {k} but the header lists {len(classes)} classes")
    if cin != x.channels:
        raise ModelFileError(f"{where}: in_channels is {cin} but its input {node['inputs'][0]!r} has "
                             f"{x.channels} channel(s)")
    if x.factor != (1, 1, 1):
        raise ModelFileError(f"{where}: the classifier input must be at the input resolution, but "
                             f"{node['inputs'][0]!r} is downsampled by {list(x.factor)}")
    _check_tensors(node, where, {"weight": ((k, cin), "float32"), "bias": ((k,), "float32")}, table,
                   used_by, f"from classes {k}, in_channels {cin}")
    return _Value("logits", k, x.factor)


def _check_ternary_input(value, where, source, op):
    if value.kind != "ternary":
        raise ModelFileError(f"{where}: {op} needs a ternary map, but input {source!r} is the float "
                             "image (only float_conv3d reads the image)")


def _check_factor(factor, where):
    if max(factor) > MAX_DOWNSAMPLING:
        raise ModelFileError(f"{where}: downsampled by {list(factor)}, more than the limit of "
                             f"{MAX_DOWNSAMPLING} per axis")
    return factor


def _check_tensors(node, where, expected, table, used_by, reason):
    """node['tensors'] maps exactly the roles in ``expected`` to table entries of the right dtype and
    shape, none used by another node."""
    refs = _check_dict(node["tensors"], f"{where}: tensors")
    _check_keys(refs, f"{where}: tensors", tuple(expected))
    for role, (shape, dtype) in expected.items():
        tensor = refs[role]
        _check_string(tensor, f"{where}: tensors.{role}")
        if tensor not in table:
            raise ModelFileError(f"{where}: {role} tensor {tensor!r} is not in the tensor table")
        if tensor in used_by:
            raise ModelFileError(f"{where}: tensor {tensor!r} is already used by node {used_by[tensor]!r} "
                                 "(each tensor belongs to exactly one node)")
        used_by[tensor] = node["name"]
        entry = table[tensor]
        if entry["dtype"] != dtype:
            raise ModelFileError(f"{where}: {role} {tensor!r} has dtype {entry['dtype']}, expected {dtype}")
        if tuple(entry["shape"]) != shape:
            raise ModelFileError(f"{where}: {role} has shape {tuple(entry['shape'])}, expected {shape} "
                                 f"{reason}")


# ------------------------------------------------------------------------------------ writing

def encode_model(*, graph, tensors, metadata, preprocessing, classes):
    """The bytes of a model file, validated by the reader's own checks (ModelFileError if invalid).

    ``tensors``: name -> numpy array; int8 (values in {-1, 0, +1}) is stored as ternary2, float32
    and int32 as themselves. Tensors are laid out in the mapping's order.
    """
    if not isinstance(tensors, Mapping):
        raise ModelFileError(f"tensors must be a mapping of name -> numpy array, got "
                             f"{type(tensors).__name__}")
    table, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise ModelFileError(f"tensor names must be strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise ModelFileError(f"tensor {name!r} must be a numpy array, got {type(array).__name__}")
        if array.dtype == np.int8:
            dtype = "ternary2"
            try:
                blob = encode_ternary2(array)
            except ValueError as error:
                raise ModelFileError(f"tensor {name!r}: {error}") from None
        elif array.dtype in (np.float32, np.int32):
            dtype = array.dtype.name
            blob = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        else:
            raise ModelFileError(f"tensor {name!r} has dtype {array.dtype}; the format stores float32, int32 "
                                 "and int8 in {-1, 0, +1} (as ternary2)")
        table[name] = {"dtype": dtype, "shape": list(array.shape), "offset": offset, "nbytes": len(blob)}
        blobs.append((offset, blob))
        offset = _align(offset + len(blob))
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ops_version": OPS_VERSION,
              "metadata": metadata, "preprocessing": preprocessing,
              "classes": list(classes) if isinstance(classes, (list, tuple)) else classes,
              "graph": list(graph) if isinstance(graph, (list, tuple)) else graph, "tensors": table}
    try:
        text = json.dumps(header, indent=1, ensure_ascii=False, allow_nan=False, default=_json_default)
        header_bytes = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        raise ModelFileError(f"the header cannot be written as JSON: {error}") from None
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ModelFileError(f"the header takes {len(header_bytes)} bytes, more than the limit of "
                             f"{MAX_HEADER_BYTES}")
    payload_start = _align(PREAMBLE_BYTES + len(header_bytes))
    data = bytearray(payload_start + offset + CHECKSUM_BYTES)
    data[:PREAMBLE_BYTES] = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header_bytes))
    data[PREAMBLE_BYTES:PREAMBLE_BYTES + len(header_bytes)] = header_bytes
    for start, blob in blobs:
        data[payload_start + start:payload_start + start + len(blob)] = blob
    data[-CHECKSUM_BYTES:] = hashlib.sha256(memoryview(data)[:-CHECKSUM_BYTES]).digest()
    data = bytes(data)
    _parse(np.frombuffer(data, np.uint8))  # the reader's validation, exactly
    return data


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def write_model(path, *, graph, tensors, metadata, preprocessing, classes, overwrite=False):
    """Validate and write a model file atomically; returns the number of bytes written.

    Refuses an existing ``path`` (FileExistsError) unless ``overwrite=True``. The file is written to a
    temporary file in the same directory, flushed to disk, then moved into place, so a reader never
    sees a partial file and nothing is left behind on failure.
    """
    data = encode_model(graph=graph, tensors=tensors, metadata=metadata, preprocessing=preprocessing,
                        classes=classes)
    return _atomic.write_bytes(path, data, overwrite, what="a model file")


# ------------------------------------------------------------------------------------ reporting

def model_sizes(model):
    """Sizes for reporting: the file, all tensors as float32, and the ternary conv layers (weights and
    thresholds) as stored and as float32; ``ratio`` = ternary_layers_bytes / ternary_layers_fp32_bytes
    (None without ternary layers)."""
    def stored(a):
        return -(-a.size // 4) if a.dtype == np.int8 else a.nbytes

    ternary = [name for node in model.graph if node["op"] == "ternary_conv3d"
               for name in node["tensors"].values()]
    ternary_bytes = sum(stored(model.tensors[t]) for t in ternary)
    ternary_fp32 = sum(4 * model.tensors[t].size for t in ternary)
    return {"file_bytes": model.file_size,
            "fp32_bytes": sum(4 * a.size for a in model.tensors.values()),
            "ternary_layers_bytes": ternary_bytes,
            "ternary_layers_fp32_bytes": ternary_fp32,
            "ratio": ternary_bytes / ternary_fp32 if ternary_fp32 else None}


__all__ = ["ModelFileError", "Model", "MAGIC", "FORMAT_VERSION", "OPS_VERSION", "read_model", "write_model",
           "encode_model", "encode_ternary2", "decode_ternary2", "model_sizes"]
