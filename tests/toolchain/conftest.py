"""Shared set-up of the toolchain tests (Triton AOT compile, the C++ build and cache, nvcc, the C++
ops called directly): the CPU extension, built once per session (the JIT build,
cached under ~/.cache/pyalign or $PYALIGN_CACHE_DIR, is the slow first step of this folder)."""
import pytest

from pyalign import _build
from support import torch_threads


@pytest.fixture(scope="session")
def cpu_ops():
    """torch.ops.pyalign_C with the CPU kernels. Skips only when no C++ compiler exists."""
    if _build.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the CPU extension cannot be built here")
    if _build.disabled():
        pytest.skip(f"{_build.DISABLE_ENV} is set: the extension is disabled in this run")
    try:
        return _build.load_cpu_ops()
    except RuntimeError as exc:
        pytest.fail(f"the CPU extension failed to build: {exc}")


@pytest.fixture
def threads():
    """Run a callable under a given intra-op thread count, restoring the setting after."""
    def run(count, fn):
        with torch_threads(count):
            return fn()
    return run
