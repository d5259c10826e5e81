# The C kernels are built by cffi (kernels/build_cffi.py); everything else is in pyproject.toml.
# The shipped model lives in the Slicer module's Resources/Models/; wheels carry a copy in
# TernarySegmentationLib/Models/, where TernarySegmentationLib.pipeline looks first.
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_models(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "TernarySegmentationLib", "Models")
        models = glob.glob(os.path.join("TernarySegmentation", "Resources", "Models", "*.tsm"))
        if models:
            os.makedirs(target, exist_ok=True)
        for model in models:
            shutil.copy2(model, target)


setup(cffi_modules=["kernels/build_cffi.py:ffibuilder"], cmdclass={"build_py": build_py_with_models})
