"""Containers shared by the C kernels binding and the numpy reference.

A ternary feature map is stored as two bit planes packed along channels (docs/kernels.md):
``data`` is uint8 of shape (D, H, W, 2, Cb) with Cb = ceil(C / 8); plane 0 is the nonzero mask,
plane 1 the sign (1 = -1); channel c is bit c % 8 of byte c // 8.
"""

from dataclasses import dataclass

import numpy as np

OCTET = 8  # filters per packed weight group (one AVX-512 register of 64-bit words)


def channel_bytes(channels):
    """Bytes per plane per voxel for a map with ``channels`` channels."""
    return (int(channels) + 7) // 8


def k_words(in_channels, kernel_size):
    """64-bit words per filter and plane: the taps' channel bytes, padded to 8 bytes."""
    taps = int(np.prod(kernel_size))
    return (taps * channel_bytes(in_channels) + 7) // 8


def conv_out_size(size, stride):
    """Output size of a "same"-padded convolution or pooling: ceil(size / stride)."""
    return tuple(-(-int(n) // int(s)) for n, s in zip(size, stride))


class TernaryMap:
    """A packed ternary feature map: ``data`` uint8 (D, H, W, 2, Cb) and its channel count."""

    __slots__ = ("data", "channels")

    def __init__(self, data, channels, validate=True):
        """Wrap packed ``data``; ``validate`` checks the canonical form (kernels rely on it: sign
        bits only where the mask is set, padding channel bits zero). Maps the kernels make skip it."""
        channels = int(channels)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise ValueError(f"TernaryMap data must be a uint8 numpy array, got {type(data).__name__} "
                             f"{getattr(data, 'dtype', '')}")
        cb = channel_bytes(channels)
        if data.ndim != 5 or data.shape[3] != 2 or data.shape[4] != cb or min(data.shape) < 1:
            raise ValueError(f"TernaryMap data for {channels} channels must have shape (D, H, W, 2, {cb}) "
                             f"with D, H, W >= 1, got {data.shape}")
        self.data = np.ascontiguousarray(data)
        self.channels = channels
        if validate and not self.is_canonical():
            raise ValueError("TernaryMap data is not canonical: sign bits must be a subset of mask bits "
                             f"and the bits of padding channels {channels}..{8 * cb - 1} must be 0")

    @classmethod
    def zeros(cls, shape, channels):
        d, h, w = (int(n) for n in shape)
        return cls(np.zeros((d, h, w, 2, channel_bytes(channels)), np.uint8), channels, validate=False)

    @property
    def shape(self):
        """Spatial shape (D, H, W)."""
        return tuple(self.data.shape[:3])

    @property
    def nbytes(self):
        return self.data.nbytes

    def is_canonical(self):
        """True when sign bits are a subset of mask bits and padding channel bits are zero."""
        mask, sign = self.data[..., 0, :], self.data[..., 1, :]
        if np.any(sign & ~mask):
            return False
        spare = 8 * self.data.shape[4] - self.channels
        if spare:
            high = np.uint8((0xFF << (8 - spare)) & 0xFF)
            if np.any(self.data[..., -1] & high):
                return False
        return True

    def __eq__(self, other):
        return (isinstance(other, TernaryMap) and self.channels == other.channels
                and np.array_equal(self.data, other.data))

    def __repr__(self):
        return f"TernaryMap(shape={self.shape}, channels={self.channels})"


@dataclass(frozen=True)
class PackedWeights:
    """Ternary filters in the kernels' layout, with the int8 originals they came from.

    ``words``: uint64 (ceil(Cout/8), Kw, 2, 8): per octet of filters and 64-bit word of the K axis
    (taps in (kd, kh, kw) order, each Cb bytes of input channels), the mask then the sign word of
    each of the 8 filters. ``ternary``: int8 (Cout, Cin, kd, kh, kw) in {-1, 0, +1}.
    """

    words: np.ndarray
    ternary: np.ndarray

    @property
    def out_channels(self):
        return self.ternary.shape[0]

    @property
    def in_channels(self):
        return self.ternary.shape[1]

    @property
    def kernel_size(self):
        return tuple(self.ternary.shape[2:])
