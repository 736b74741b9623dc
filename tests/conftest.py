"""Test set-up. The test device is PYALIGN_TEST_DEVICE (default cpu, see tests/support.py). On
CPU, Triton kernels run in the interpreter on CPU tensors: that must be decided before anything
imports triton (``@triton.jit`` reads it at decoration time), and only then: on a GPU the kernels
run compiled."""
import os
import sys

import torch

_device = os.environ.get("PYALIGN_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if torch.device(_device).type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

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
