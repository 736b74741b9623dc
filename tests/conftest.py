"""Test set-up. Without CUDA, Triton kernels run in the interpreter on CPU tensors: that must be
decided before anything imports triton (``@triton.jit`` reads it at decoration time)."""
import os
import sys

try:  # torch is cheap to ask; importing it here does not import triton
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from its own fixed seed: fresh random inputs, reproducible failures."""
    torch.manual_seed(1234)
    yield
