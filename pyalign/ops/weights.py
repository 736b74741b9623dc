"""In-place multi-tensor weight updates: the primitives of Trust-Region reference updates and
Elastic Reset. No autograd; targets and sources may differ in dtype (an fp32 EMA of bf16
weights); math runs in fp32 with one rounding into the target. Family "weights" of
pyalign/backends.py.

    ema_(targets, sources, decay)    t = decay * t + (1 - decay) * s
    lerp_(targets, sources, weight)  t = t + weight * (s - t)
    copy_(targets, sources)          t = s
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import nn

from pyalign import backends
from pyalign._utils import KERNEL_DTYPES, local_shard

TensorsOrModule = Union[nn.Module, Iterable[torch.Tensor]]


def _as_tensor_list(name: str, tensors: TensorsOrModule, include_buffers: bool) -> list:
    if isinstance(tensors, nn.Module):
        items = [p.data for p in tensors.parameters()]
        if include_buffers:
            items += [b for b in tensors.buffers() if b.dtype.is_floating_point]
        return [local_shard(t) for t in items]
    if isinstance(tensors, torch.Tensor):
        return [local_shard(tensors)]
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(f"{name} must be an nn.Module or a list of tensors, got "
                        f"{type(tensors).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(item).__name__}, not a tensor")
    return [local_shard(t.data if isinstance(t, nn.Parameter) else t) for t in items]


def _pairs(targets: TensorsOrModule, sources: TensorsOrModule, include_buffers: bool):
    target_list = _as_tensor_list("targets", targets, include_buffers)
    source_list = _as_tensor_list("sources", sources, include_buffers)
    if len(target_list) != len(source_list):
        raise ValueError(f"targets and sources differ in length: {len(target_list)} vs "
                         f"{len(source_list)} tensors")
    for i, (target, source) in enumerate(zip(target_list, source_list)):
        if not target.dtype.is_floating_point or not source.dtype.is_floating_point:
            raise TypeError(f"tensor {i}: weight ops take floating tensors, got {target.dtype} "
                            f"and {source.dtype}")
        if target.shape != source.shape:
            raise ValueError(f"tensor {i}: target shape {tuple(target.shape)} != source shape "
                             f"{tuple(source.shape)}")
        if target.device != source.device:
            raise ValueError(f"tensor {i}: target on {target.device}, source on {source.device}")
    return target_list, source_list


def _apply(kind: str, targets, sources, scalar: float, backend: str, include_buffers: bool) -> None:
    target_list, source_list = _pairs(targets, sources, include_buffers)
    if not target_list:
        return
    by_device: dict = {}
    for target, source in zip(target_list, source_list):
        by_device.setdefault(target.device, ([], []))
        by_device[target.device][0].append(target)
        by_device[target.device][1].append(source)
    for device, (device_targets, device_sources) in by_device.items():
        kernel_ok = all(t.dtype in KERNEL_DTYPES and s.dtype in KERNEL_DTYPES
                        and t.is_contiguous() and s.is_contiguous()
                        for t, s in zip(device_targets, device_sources))
        if kernel_ok:
            name = backends.resolve("weights", backend, device)
        elif backend in ("auto", "eager"):
            name = "eager"  # fp64 or strided tensors: the foreach/eager path handles them
        else:
            raise ValueError(f"backend {backend!r} takes contiguous float32/bfloat16/float16 "
                             f"tensors; use backend='eager' for others")
        with torch.no_grad():
            backends.load("weights", name).apply_(kind, device_targets, device_sources, scalar)


def _check_fraction(name: str, value, low_open: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > 1 or (low_open and value == 0):
        bound = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def ema_(targets: TensorsOrModule, sources: TensorsOrModule, decay: float, *,
         include_buffers: bool = False, backend: str = "auto") -> None:
    """In place: ``t = decay * t + (1 - decay) * s`` for every pair (parameters of modules)."""
    _apply("ema", targets, sources, _check_fraction("decay", decay, False), backend, include_buffers)


def lerp_(targets: TensorsOrModule, sources: TensorsOrModule, weight: float, *,
          include_buffers: bool = False, backend: str = "auto") -> None:
    """In place: ``t = t + weight * (s - t)`` (the TR-DPO soft update with weight = alpha)."""
    _apply("lerp", targets, sources, _check_fraction("weight", weight, False), backend, include_buffers)


def copy_(targets: TensorsOrModule, sources: TensorsOrModule, *, include_buffers: bool = False,
          backend: str = "auto") -> None:
    """In place: ``t = s`` for every pair (TR hard update, Elastic Reset)."""
    _apply("copy", targets, sources, 0.0, backend, include_buffers)
