# The C kernels are built by cffi (kernels/build_cffi.py); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["kernels/build_cffi.py:ffibuilder"])
