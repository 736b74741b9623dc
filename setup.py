"""Packaging shim (metadata lives in pyproject.toml). Nothing is compiled at install time:
the C++/CUDA extension in csrc/ is built on first use by pyalign/_build.py."""
from setuptools import setup

setup()
