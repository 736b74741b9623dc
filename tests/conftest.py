"""Test set-up. The test device is PYALIGN_TEST_DEVICE (default cpu, see tests/support.py). On
CPU, Triton kernels run in the interpreter on CPU tensors: that must be decided before anything
imports triton (``@triton.jit`` reads it at decoration time), and only then: on a GPU the kernels
run compiled."""
import os
import sys
import warnings

import torch

_device = os.environ.get("PYALIGN_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if torch.device(_device).type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# A deprecated call that pyalign makes fails the test that made it: a DeprecationWarning or
# FutureWarning raised while a pyalign frame is on the stack is raised as an error. The
# filterwarnings of pyproject.toml catch the ones attributed to a pyalign module; most libraries
# attribute theirs to a frame of their own (transformers' deprecated `past_key_values` keyword
# points into torch.nn.Module.__call__), so the stack is searched here. Not counted: warnings a
# library raises while it is being imported (its own business, not a call of pyalign's), and
# warnings raised in C++ (torch's TORCH_WARN), which do not pass through warnings.warn.
_DEPRECATIONS = (DeprecationWarning, FutureWarning)
_python_warn = warnings.warn


def _pyalign_call_site(frame):
    """"module:line" of the innermost pyalign frame above ``frame``, or None (also when an
    import runs between it and ``frame``)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return None
        module = frame.f_globals.get("__name__", "")
        if module == "pyalign" or module.startswith("pyalign."):
            return f"{module}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    if issubclass(category, _DEPRECATIONS):
        site = _pyalign_call_site(sys._getframe(1))
        if site is not None:
            raise category(f"{message} (a deprecated call made by pyalign, at {site})")
    return _python_warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _warn

# Under pytest-xdist (`-n 2`, .ci/run) each worker gets one core's worth of torch threads: two
# workers of 2 threads each on 2 cores would oversubscribe. Tests of thread-count behaviour set
# their own counts (tests/support.py torch_threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from its own fixed seed: fresh random inputs, reproducible failures."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def task_cache_dir(tmp_path_factory):
    """One embedded-task cache for the session: the trainer and export tests build the same tiny
    task (tests/trainers/trainer_helpers.py TINY_TASK) once."""
    return str(tmp_path_factory.mktemp("task-cache"))
