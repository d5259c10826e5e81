"""A minimal PNG writer (numpy + zlib): 8-bit greyscale or RGB, no interlacing, filter type 0.

Enough for the demo's figure without matplotlib or PIL at inference. Layout (PNG specification,
ISO/IEC 15948): the 8-byte signature, then chunks of length (4 bytes, big-endian), type (4 ASCII
bytes), data and the CRC-32 of type + data: IHDR (width, height, bit depth 8, colour type 0 = grey
or 2 = RGB, compression 0, filter method 0, interlace 0), one IDAT holding the zlib stream of the
scanlines, each prefixed with its filter byte 0 (none), and an empty IEND.
"""

import os
import struct
import zlib

import numpy as np

from . import _atomic

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 greyscale, 2 RGB)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels, level=6):
    """uint8 (H, W) greyscale or (H, W, 3) RGB -> the bytes of a PNG file."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got dtype {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOUR_TYPES or min(pixels.shape[:2]) < 1:
        raise ValueError(f"pixels must have shape (H, W) or (H, W, 3) with H, W >= 1, got {pixels.shape}")
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # column 0: filter byte 0 (none)
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + _chunk(b"IEND", b""))


def write_png(path, pixels, overwrite=False):
    """Write ``encode_png(pixels)`` to ``path`` atomically (temporary file + rename); an existing
    file is replaced only with ``overwrite`` (FileExistsError otherwise). Returns the path."""
    _atomic.write_bytes(path, encode_png(pixels), overwrite)
    return os.fspath(path)


__all__ = ["encode_png", "write_png"]
