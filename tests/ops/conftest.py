"""Set-up of the op tests (the public API over every backend of the test device): tensors are
created on support.DEVICE, and every backend output buffer with a poison hook starts NaN-filled."""
import pytest
import torch

from support import DEVICE, ON_CPU, poisoned_outputs


def pytest_configure(config):
    # The Triton interpreter evaluates masked-off lanes too (log 0, 0 * inf) and numpy warns
    # about them; on a GPU those lanes are never used either. Results are checked, not warnings.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _on_test_device():
    """Factory calls without a device (torch.randn(...), torch.tensor(...)) make tensors on the
    test device. On CPU that is already torch's default (and the mode costs time per call)."""
    if ON_CPU:
        yield
        return
    with torch.device(DEVICE):
        yield


@pytest.fixture(autouse=True)
def _poison_outputs():
    """An element a kernel forgets to write shows up as NaN (see support.poisoned_outputs)."""
    with poisoned_outputs():
        yield


@pytest.fixture
def restored_table():
    """Snapshot the backend table (pyalign/backends.py) and restore it afterwards: for tests that
    register fake implementations."""
    from pyalign import backends

    tables = (backends._loaders, backends._loaded, backends._failures, backends._warned)
    saved = [table.copy() for table in tables]
    yield
    for table, original in zip(tables, saved, strict=True):
        table.clear()
        table.update(original)
