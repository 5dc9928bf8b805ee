"""setuptools entry point: only here because cffi_modules needs it (metadata lives in pyproject.toml)."""

from setuptools import setup

setup(cffi_modules=["native/build_netstack.py:ffibuilder"])
