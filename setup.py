"""Builds the kernels: `pip install --no-build-isolation -e .` (see extensions.py for the switches)."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extensions  # noqa: E402

# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
extensions.configure_environment()
from torch.utils.cpp_extension import BuildExtension  # noqa: E402

setup(
    name="maskrcnn",
    version="0.1.0",
    description="Mask R-CNN in PyTorch with its own NMS and RoIAlign kernels",
    python_requires=">=3.9",
    packages=list(extensions.PACKAGES),
    py_modules=["extensions"],
    ext_modules=extensions.extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
