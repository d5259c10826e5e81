"""Slicer-free core of TernarySegmentation: the C kernels binding and its numpy oracle, the packed
model file reader/writer and the network executor (preprocessing and the segmentation pipeline
follow). Needs only numpy and cffi; never imports torch."""

__version__ = "0.1.0"
