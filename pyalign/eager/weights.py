"""Eager multi-tensor weight updates: the reference implementation of the ``weights`` family.

The family's contract (every backend's primitive):

apply_(kind, targets, sources, scalar)   kind in {"lerp", "copy"} (ema_ runs as lerp with weight
    1 - decay); in place, no autograd. The kernel backends get contiguous float32/bfloat16/float16
    tensors only (pyalign/backends.py sends the others here).

``apply_`` runs lerp/copy in place over lists, grouped by dtype and device, with torch's foreach
ops for fp32 and fp32 math with one rounding otherwise.
"""
from __future__ import annotations

import torch

from pyalign._utils import accumulation_dtype

PRIMITIVES = ("apply_",)


def _group_by_dtype(targets, sources):
    groups: dict = {}
    for target, source in zip(targets, sources, strict=True):
        groups.setdefault((target.dtype, source.dtype, target.device), []).append((target, source))
    return groups.values()


@torch.no_grad()
def apply_(kind, targets, sources, scalar):
    """In place over lists: lerp t = t + s*(src - t); copy t = src."""
    for pairs in _group_by_dtype(targets, sources):
        group_targets = [t for t, _ in pairs if t.numel()]
        group_sources = [s for t, s in pairs if t.numel()]
        if not group_targets:
            continue
        if kind == "copy":
            for target, source in zip(group_targets, group_sources, strict=True):
                target.copy_(source)
            continue
        weight = scalar  # lerp (ema_ arrives as lerp with weight 1 - decay)
        same_dtype = group_targets[0].dtype == group_sources[0].dtype
        if same_dtype and group_targets[0].dtype == torch.float32:
            torch._foreach_lerp_(group_targets, group_sources, weight)
        else:
            # Mixed or low-precision dtypes: fp32 math, one rounding at the end.
            for target, source in zip(group_targets, group_sources, strict=True):
                acc = accumulation_dtype(target, source)
                updated = target.to(acc)
                updated.lerp_(source.to(acc), weight)
                target.copy_(updated)
