"""Reused CPU scratch buffers: the fused head's kept logits (``memory_budget=``) between calls.

glibc hands every freed block over 32 MiB back to the kernel, so a large buffer allocated anew
each call comes back as fresh pages, and the first write to each 4 KiB page faults (what that
costs the head is in benchmarks/README.md). The chunked head takes its kept logits from here
and gives them back once its backward has turned them into their gradient and used it, so the
next call reuses the same pages, as CUDA's caching allocator does on a GPU. A buffer is handed to
one call at a time (a taken one leaves the cache, so two graphs alive at once get two buffers);
one free buffer per dtype is kept, the largest given back. ``empty_cache()`` frees them.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_free: dict[torch.dtype, torch.Tensor] = {}  # flat, contiguous, on the CPU


def take(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor; on the CPU, a view of the cached buffer when it is
    large enough (the cached buffer then leaves the cache until ``give_back``)."""
    numel = rows * cols
    if device.type != "cpu" or numel == 0:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    with _lock:
        flat = _free.pop(dtype, None)
    if flat is None or flat.numel() < numel:
        del flat  # a smaller cached buffer is freed before the larger one is allocated
        flat = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(rows, cols)


def give_back(tensor: torch.Tensor) -> None:
    """Return a tensor from ``take`` whose contents are no longer needed; the caller must not
    touch it afterwards. Anything else is ignored (left to be freed as usual)."""
    flat = tensor._base if tensor._base is not None else tensor
    if flat.device.type != "cpu" or flat.numel() == 0 or flat.dim() != 1:
        return
    with _lock:
        held = _free.get(flat.dtype)
        if held is None or held.numel() < flat.numel():
            _free[flat.dtype] = flat


def cached_bytes() -> int:
    """Bytes the cache holds now."""
    with _lock:
        return sum(flat.numel() * flat.element_size() for flat in _free.values())


def empty_cache() -> None:
    """Free the cached buffers (the next ``memory_budget=`` call allocates anew)."""
    with _lock:
        _free.clear()
