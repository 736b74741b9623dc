"""Small helpers shared by test folders (importable as ``testutil``: tests/ is on sys.path)."""
import contextlib

import torch


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block under ``count`` intra-op threads, restoring the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def poison_(tensor):
    """NaN-fill (max-fill for integers) an output buffer so an element a kernel forgets to write
    shows up."""
    if tensor.dtype.is_floating_point:
        return tensor.fill_(float("nan"))
    return tensor.fill_(torch.iinfo(tensor.dtype).max)
