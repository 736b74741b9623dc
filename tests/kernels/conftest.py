"""Kernel tests: tests/conftest.py has already set TRITON_INTERPRET=1 when there is no GPU, so
the kernels run in Triton's interpreter on CPU tensors (on a GPU, on CUDA tensors)."""
import pytest
import torch

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
