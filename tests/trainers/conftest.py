"""Fixtures of the trainer tests: a tiny embedded task built once per session in the session's
temporary cache directory (``task_cache_dir``, tests/conftest.py). Helpers live in
trainer_helpers.py."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from trainer_helpers import TINY_TASK  # noqa: E402

from support import torch_threads  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster than two fighting over 2 shared
    cores, and keeps the trainer tests inside their time budget."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_task(task_cache_dir):
    from pyalign.tasks import TaskConfig, make_task
    return make_task(0, cache_dir=task_cache_dir, progress=False, config=TaskConfig(**TINY_TASK))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A user's model directory: a tiny Llama and its own tokenizer (tests/hf_models.py)."""
    from hf_models import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama")
