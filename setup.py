"""Build the optional C kernel for Floyd-Steinberg dithering (all metadata is in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gpu_kquant._fsdither", ["gpu_kquant/_fsdither.c"], optional=True)])
