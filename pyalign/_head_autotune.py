"""The measurement behind ``strategy="auto"`` of the fused head (docs/gpu.md): on first use per
(GPU, dtype, shape bucket), time one forward + backward of each strategy on the call's own
tensors and keep the faster, in memory and in a JSON file under pyalign's cache root, the way
Triton's autotuner keeps its configurations. pyalign/backends.py decides when to measure and
what the candidates are; this module only measures, remembers and lists.

    winner = choose(hidden, weight, {"fused": fused_impl, "chunked": chunked_impl})

The file (``cache_path()``) holds ``{"versions": {...}, "entries": {key: {"strategy": ...,
"ms": {...}}}}``; entries written by other pyalign / torch / triton versions are ignored (the
kernels may have changed), a file that cannot be read as such is ignored with a warning (and
replaced on the next write), and writes are atomic (a temporary file, then a rename), merged with
what another process wrote meanwhile. ``pyalign doctor`` prints ``describe()``.
"""
from __future__ import annotations

import json
import math
import platform
import threading
import time
import warnings
from typing import Callable, Optional

import torch

from pyalign._utils import atomic_write, cache_root

CACHE_FILE = "head_strategy.json"
# Token counts are bucketed by powers of two; a call with more rows than the largest bucket is
# timed on its first LARGEST_BUCKET rows (the strategies' costs grow in proportion past it).
LARGEST_BUCKET = 1 << 15
# A candidate that runs out of memory while timed loses (``math.inf``).
_LOSS = math.inf

# Timer: (name, run) -> seconds of one run (the default warms up first: a Triton kernel compiles
# on its first launch). Tests inject a fake one.
Timer = Callable[[str, Callable[[], object]], float]

_lock = threading.Lock()
_memory: dict[str, dict] = {}
_loaded = False


def versions() -> dict:
    import pyalign
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"pyalign": pyalign.__version__, "torch": torch.__version__, "triton": triton_version}


def cache_path():
    return cache_root(CACHE_FILE)


def device_name(device: torch.device) -> str:
    """The GPU's name (its timings hold for that model only), or the CPU's for CPU tensors."""
    try:
        return torch.cuda.get_device_name(device)
    except (AssertionError, RuntimeError, ValueError):  # not a CUDA device
        return platform.processor() or platform.machine() or str(device)


def bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at most LARGEST_BUCKET)."""
    return min(LARGEST_BUCKET, 1 << max(0, int(tokens) - 1).bit_length())


def key(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The cache key of a call: GPU, dtype, token bucket, hidden size and vocabulary."""
    dtype = str(hidden.dtype).removeprefix("torch.")
    if weight.dtype != hidden.dtype:
        dtype += f"/{str(weight.dtype).removeprefix('torch.')}"
    return (f"{device_name(hidden.device)}|{dtype}|N<={bucket(hidden.shape[0])}|"
            f"H={hidden.shape[1]}|V={weight.shape[0]}")


def _read_file() -> dict:
    """The file's entries of this version ({} when absent, stale or unreadable: warned)."""
    path = cache_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"pyalign: cannot read the head strategy cache {path} ({exc}); measuring "
                      "again", RuntimeWarning, stacklevel=3)
        return {}
    try:
        payload = json.loads(text)
        entries = payload["entries"]
        if not isinstance(entries, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("strategy"), str) for v in entries.values()):
            raise ValueError("entries must map keys to {'strategy': ..., 'ms': ...}")
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"pyalign: ignoring the corrupt head strategy cache {path} "
                      f"({type(exc).__name__}: {exc}); it is rewritten on the next measurement",
                      RuntimeWarning, stacklevel=3)
        return {}
    return entries if payload.get("versions") == versions() else {}


def _write_file(name: str, entry: dict) -> None:
    """Merge ``entry`` into the file (atomically); a cache that cannot be written only warns."""
    entries = _read_file()
    entries[name] = entry
    try:
        atomic_write(cache_path(), json.dumps({"versions": versions(), "entries": entries},
                                              indent=1, sort_keys=True))
    except OSError as exc:
        warnings.warn(f"pyalign: cannot write the head strategy cache {cache_path()} ({exc}); the "
                      "choice holds for this process only", RuntimeWarning, stacklevel=3)


def cached(name: str) -> Optional[dict]:
    """The entry of cache key ``name`` (memory first, then the file), or None."""
    global _loaded
    with _lock:
        if not _loaded:
            _memory.update({k: v for k, v in _read_file().items() if k not in _memory})
            _loaded = True
        return _memory.get(name)


def forget() -> None:
    """Drop what this process remembers (the file stays): the next lookup reads it again."""
    global _loaded
    with _lock:
        _memory.clear()
        _loaded = False


def choose(hidden: torch.Tensor, weight: torch.Tensor, candidates: dict,
           timer: Optional[Timer] = None) -> str:
    """The cached winner for these tensors' key, else the faster of ``candidates`` ({strategy:
    implementation of the linear_logprobs family}) on one forward + backward of these tensors,
    remembered and written to the cache file."""
    name = key(hidden, weight)
    entry = cached(name)
    if entry is not None and entry["strategy"] in candidates:
        return entry["strategy"]
    seconds = {strategy: _timed(timer or TIMER, strategy, implementation, hidden, weight)
               for strategy, implementation in candidates.items()}
    winner = min(seconds, key=seconds.get)  # ties: the first candidate
    entry = {"strategy": winner, "ms": {s: round(t * 1e3, 4) if math.isfinite(t) else None
                                        for s, t in seconds.items()},
             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    with _lock:
        _memory[name] = entry
        _write_file(name, entry)
    return winner


def _timed(timer: Timer, strategy: str, implementation, hidden, weight) -> float:
    """Seconds of one forward + backward of ``implementation`` (no bias, no entropy, the head
    options off) on ``hidden`` (its first LARGEST_BUCKET rows) and ``weight``."""
    rows = hidden.detach()[:LARGEST_BUCKET]
    weight = weight.detach()
    labels = torch.randint(0, weight.shape[0], (rows.shape[0],), device=rows.device)
    upstream = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)

    def run():
        outputs = implementation.forward(rows, weight, None, labels, -100, 1.0, False, None, None,
                                         1.0, (False, False, False), 0)
        stats, kept = outputs[2], outputs[-1]
        return implementation.backward(upstream, None, rows, weight, None, labels, stats, None,
                                       -100, 1.0, None, None, 1.0, kept)
    try:
        return float(timer(strategy, run))
    except torch.OutOfMemoryError:
        return _LOSS


def cuda_timer(name: str, run: Callable[[], object]) -> float:
    """One warm-up run (compiles the kernels), then one timed with CUDA events."""
    del name
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


# The timer ``choose`` uses unless given one (tests replace it with a fake).
TIMER: Timer = cuda_timer


def describe() -> list[str]:
    """Lines for ``pyalign doctor``: the cache file and each entry of this version."""
    entries = _read_file()
    lines = [f"head strategy cache {cache_path()}: {len(entries)} entr"
             f"{'y' if len(entries) == 1 else 'ies'} for {versions()}"]
    for name, entry in sorted(entries.items()):
        times = ", ".join(f"{s} {ms} ms" for s, ms in entry.get("ms", {}).items())
        lines.append(f"  {name} -> {entry['strategy']} ({times})")
    return lines
