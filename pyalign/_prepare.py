"""What a run builds once, built before its progress bar starts, each build with its own lines.

A first `pyalign train`, `pyalign study` or `pyalign bench` on a machine compiles the C++
extension (pyalign/_build.py, cached per machine) and, for the embedded task, trains its SFT
model and fits its proxy reward (pyalign.tasks, cached per seed and size). Left to the first op
that needs them, those builds ran inside training step 1: the bar sat at 0 % with a false ETA,
the build's line was glued onto it, and step 1's ``step_time_s`` / ``tokens_per_s`` in
metrics.jsonl held the build. ``prepare_run`` does both up front instead, so no step's time and
no benchmark timing includes a build. Each build says what it builds, why, for how long at most,
and then how long it took; a cached one says nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

# The default TaskConfig's SFT model and proxy reward took 18 s on one thread of a 2-core AMD
# EPYC VM at load average 5-8 (2026-12-07): a minute leaves room for a slower machine.
TASK_BUILD_TIME = "at most about a minute on 2 cores"


def prepare_extension(device, backend: str = "auto") -> None:
    """Load (building it if it is not cached) the C++ extension the ops will use for tensors on
    ``device`` under ``backend``, by resolving every op family's backend now: pyalign/_build.py
    announces a build and its duration; an extension that cannot load warns here, once per family,
    that its ops run on the next backend. A backend named explicitly that cannot run is left to
    raise at the op, as it would have."""
    import torch

    from pyalign import backends

    device_type = torch.device(device).type
    for family in backends.families():
        try:
            backends.resolve(family, backend, device_type)
        except backends.BackendUnavailable:
            pass


def _task_cached(seed: int, config, cache_dir) -> Optional[str]:
    """The cache directory of the task, or None when it holds no complete entry."""
    from pyalign.tasks.task import _cache_root, cache_key

    path = _cache_root(cache_dir) / cache_key(seed, config)
    return str(path) if (path / "meta.json").exists() else None


def prepare_task(seed: int, config: Optional[dict] = None, cache_dir=None, progress: bool = True) -> None:
    """Build the embedded task (``pyalign.tasks.make_task`` with the same arguments, so the run's
    own call loads it from the cache) when it is not cached, with a line before and after."""
    import pyalign.tasks

    task_config = pyalign.tasks.TaskConfig(**config) if config else pyalign.tasks.TaskConfig()
    if _task_cached(seed, task_config, cache_dir):
        return
    from pyalign.tasks.task import _cache_root
    print(f"pyalign: building the embedded task (seed {seed}): its synthetic language, an SFT model "
          f"({task_config.sft_steps} steps) and a proxy reward model, into "
          f"{_cache_root(cache_dir)}: the run starts from that SFT model and no copy of it is "
          f"cached yet. Once per seed and task size; {TASK_BUILD_TIME}...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    pyalign.tasks.make_task(seed, cache_dir=cache_dir, progress=progress, config=task_config)
    if not progress:  # with progress, make_task prints its own line with the time
        print(f"pyalign: built the embedded task in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)


def prepare_run(device, backend: str = "auto", *, task_seed: Optional[int] = None,
                task_config: Optional[dict] = None, task_cache_dir=None, progress: bool = True,
                main_process: bool = True) -> None:
    """Build what a run on ``device`` with op ``backend`` needs, before its progress bar: the
    C++ extension, then (``task_seed`` given: a run on the embedded task; ``task_config``, a dict
    of TaskConfig fields) the task. In a distributed run every process loads the extension (its
    file lock makes one of them build it) and only the main one builds the task, which the others
    load from the cache once the main one has written it."""
    prepare_extension(device, backend)
    if task_seed is not None and main_process:
        prepare_task(task_seed, task_config, task_cache_dir, progress)
