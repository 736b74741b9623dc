"""Eager multi-tensor weight updates: the reference implementation of the ``weights`` family.

The family's contract (every backend's primitives):

apply_(kind, targets, sources, scalar)   kind in {"lerp", "copy"} (ema_ runs as lerp with weight
    1 - decay); in place, no autograd.
bema_(targets, emas, params, inits, alpha, beta)   four lists of one length, each index's tensors
    of one shape and device, emas[i] and inits[i] of one dtype; in place: ema = lerp(ema, param,
    beta) stored, then target = ema + alpha * (param - init).
The kernel backends get contiguous float32/bfloat16/float16 tensors only (pyalign/backends.py
sends the others here).

``apply_`` runs lerp/copy in place over lists, grouped by dtype and device, with torch's foreach
ops for fp32 and fp32 math with one rounding otherwise; ``bema_`` is BEMA's update
(docs/algorithms.md "BEMA") as torch ops, a few passes over the tensors where the kernels make
one.
"""
from __future__ import annotations

import torch

from pyalign._utils import accumulation_dtype

PRIMITIVES = ("apply_", "bema_")


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


def _bema_fp32(targets, emas, params, inits, alpha, beta):
    """Every tensor fp32: torch's foreach ops, one list-wide pass per step."""
    torch._foreach_lerp_(emas, params, beta)
    corrections = torch._foreach_sub(params, inits)
    torch._foreach_mul_(corrections, alpha)
    torch._foreach_add_(corrections, emas)
    torch._foreach_copy_(targets, corrections)


@torch.no_grad()
def bema_(targets, emas, params, inits, alpha, beta):
    """In place over lists: ema = lerp(ema, param, beta), stored; target = ema + alpha*(param - init)."""
    groups = [group for group in zip(targets, emas, params, inits, strict=True) if group[0].numel()]
    if all(t.dtype == torch.float32 for group in groups for t in group):
        if groups:
            _bema_fp32(*map(list, zip(*groups)), alpha, beta)
        return
    for target, ema, param, init in groups:
        # fp32 math (fp64 for fp64 tensors), one rounding into each written tensor
        acc = torch.promote_types(torch.promote_types(target.dtype, ema.dtype),
                                  torch.promote_types(param.dtype, torch.float32))
        theta = param.to(acc)
        ema.copy_(ema.to(acc).lerp(theta, beta))
        target.copy_(torch.add(ema.to(acc), theta - init.to(acc), alpha=alpha))
