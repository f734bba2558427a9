"""Builds the C++ CPU backend ``sparseinfer._C`` with CMake (see CMakeLists.txt).

SPARSEINFER_BUILD_EXT=0 installs pure Python (the reference and Triton backends still work)."""

from setuptools import setup

setup()
