"""Triton kernel tests run in the interpreter on CPU tensors when no GPU is present.

tests/conftest.py sets TRITON_INTERPRET=1 the same way; repeating it here keeps this folder
runnable on its own (``pytest tests/kernels``). It must happen before triton.jit decorates the
kernels, that is before pyalign.kernels.* is imported.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the float64 oracle of these tests (oracle64.py) imports by name, as under tests/
sys.path.insert(0, os.path.dirname(__file__))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    # The interpreter evaluates masked-off lanes too (log 0, 0 * inf) and numpy warns about them;
    # on a GPU those lanes are never used either. Results are checked, not warnings.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output buffer starts NaN-filled, so an unwritten element fails the test."""
    from pyalign import kernels
    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


@pytest.fixture
def device():
    return DEVICE
