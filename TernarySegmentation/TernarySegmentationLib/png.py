"""A minimal PNG writer (numpy + zlib): 8-bit greyscale or RGB, no interlacing, filter type 0.

Enough for the demo's figure without matplotlib or PIL at inference. Layout (PNG specification,
ISO/IEC 15948): the 8-byte signature, then chunks of length (4 bytes, big-endian), type (4 ASCII
bytes), data and the CRC-32 of type + data: IHDR (width, height, bit depth 8, colour type 0 = grey
or 2 = RGB, compression 0, filter method 0, interlace 0), one IDAT holding the zlib stream of the
scanlines, each prefixed with its filter byte 0 (none), and an empty IEND.
"""

import contextlib
import os
import secrets
import struct
import zlib

import numpy as np

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
    path = os.fspath(path)
    data = encode_png(pixels)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; it is replaced only with overwrite=True (--overwrite)")
    folder, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # atomic, and never replaces a file that appeared meanwhile
            except OSError as error:
                # FileExistsError: it appeared meanwhile; otherwise no hard links here: check, then
                # rename (a narrow race remains)
                if isinstance(error, FileExistsError) or os.path.lexists(path):
                    raise FileExistsError(f"{path} already exists; it is replaced only with "
                                          "overwrite=True (--overwrite)") from None
                os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return path


__all__ = ["encode_png", "write_png"]
