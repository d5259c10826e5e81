"""Slicer-free core of TernarySegmentation: kernels binding, numpy reference, (later) model reader,
preprocessing and network executor. Needs only numpy and cffi."""

__version__ = "0.1.0"
