"""In-place multi-tensor weight updates: the primitives of Trust-Region reference updates,
Elastic Reset and BEMA. No autograd; targets and sources may differ in dtype (an fp32 EMA of bf16
weights); math runs in fp32 with one rounding into each written tensor. Family "weights" of
pyalign/backends.py.

    ema_(targets, sources, decay)    t = decay * t + (1 - decay) * s
    lerp_(targets, sources, weight)  t = t + weight * (s - t)
    copy_(targets, sources)          t = s
    bema_(targets, emas, params, inits, alpha=, beta=)
                                     e = (1 - beta) * e + beta * p;  t = e + alpha * (p - i)

Pairing: two modules pair by parameter (and, with include_buffers, floating buffer) name,
canonicalised by pyalign._utils.canonical_param_name so DDP's ``module.`` and torch.compile's
``_orig_mod.`` prefixes match; names on one side only raise, listing them. A list of tensors (or
a module against a list) pairs by position.

Aliasing: the kernels update tensors in parallel chunks, so a byte written through one target
and read or written through another pair would give results that depend on thread timing. No
target may share a byte with another target or with another pair's source, nor with its own
source unless it *is* that source (the same tensor, same view): ema/lerp/copy of t with itself
is t, a no-op that stays allowed. Checked before any update, by storage address and the byte
ranges (exact element sets where strided ranges interleave); disjoint views of one buffer are fine.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Iterable, Union

import torch
from torch import nn

from pyalign import backends
from pyalign._utils import local_shard, named_tensors

TensorsOrModule = Union[nn.Module, Iterable[torch.Tensor]]


def _named_module_tensors(name: str, module: nn.Module, include_buffers: bool) -> dict:
    """canonical name -> local tensor, in registration order (parameters, then buffers)."""
    return {key: local_shard(tensor)
            for key, tensor in named_tensors(module, name, include_buffers=include_buffers).items()}


def _as_tensor_list(name: str, tensors, include_buffers: bool) -> list:
    if isinstance(tensors, nn.Module):
        return list(_named_module_tensors(name, tensors, include_buffers).values())
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


def _paired_lists(targets, sources, include_buffers: bool):
    """(target tensors, source tensors, names or None): by name for two modules, else by
    position (names from whichever side is a module, for messages)."""
    if isinstance(targets, nn.Module) and isinstance(sources, nn.Module):
        target_named = _named_module_tensors("targets", targets, include_buffers)
        source_named = _named_module_tensors("sources", sources, include_buffers)
        if target_named.keys() != source_named.keys():
            only_targets = sorted(target_named.keys() - source_named.keys())
            only_sources = sorted(source_named.keys() - target_named.keys())
            parts = []
            if only_targets:
                parts.append(f"missing from sources: {only_targets}")
            if only_sources:
                parts.append(f"missing from targets: {only_sources}")
            counts = (f"differ in length: {len(target_named)} vs {len(source_named)} tensors"
                      if len(target_named) != len(source_named) else "differ in tensor names")
            raise ValueError(f"targets and sources (modules, paired by name) {counts}; "
                             f"{'; '.join(parts)}")
        names = list(target_named)
        return [target_named[n] for n in names], [source_named[n] for n in names], names
    target_list = _as_tensor_list("targets", targets, include_buffers)
    source_list = _as_tensor_list("sources", sources, include_buffers)
    module_side = next((side for side in (sources, targets) if isinstance(side, nn.Module)), None)
    names = (None if module_side is None
             else list(named_tensors(module_side, "", include_buffers=include_buffers)))
    return target_list, source_list, names


def _pairs(targets: TensorsOrModule, sources: TensorsOrModule, include_buffers: bool):
    target_list, source_list, names = _paired_lists(targets, sources, include_buffers)
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
    _check_no_aliasing(target_list, source_list, names)
    return target_list, source_list


# ------------------------------------------------------------------------------ aliasing

def _extent(tensor: torch.Tensor):
    """(device, storage address, first byte, end byte) of a tensor's elements, None when it
    has none (empty) or no real storage (meta)."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.device, tensor.untyped_storage().data_ptr(), first,
            first + (last + 1) * size)


def _element_offsets(tensor: torch.Tensor) -> torch.Tensor:
    """Storage offsets (in elements) of every element of ``tensor``, on the CPU."""
    offsets = torch.full((), tensor.storage_offset(), dtype=torch.int64)
    for n, stride in zip(tensor.shape, tensor.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * stride
    return offsets.reshape(-1)


def _share_bytes(a: torch.Tensor, extent_a, b: torch.Tensor, extent_b) -> bool:
    if extent_a is None or extent_b is None or extent_a[:2] != extent_b[:2]:
        return False
    if extent_a[3] <= extent_b[2] or extent_b[3] <= extent_a[2]:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    size = a.element_size()
    if b.element_size() != size:  # byte ranges overlap, another dtype: assume they share
        return True
    # strided views whose ranges interleave (t[:, ::2] and t[:, 1::2]): compare elements
    return bool(torch.isin(_element_offsets(a), _element_offsets(b)).any())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _check_no_aliasing(target_list: list, source_list: list, names) -> None:
    def label(side: str, i: int) -> str:
        return f"{side}[{i}]" + (f" ({names[i]!r})" if names is not None and i < len(names) else "")

    _check_disjoint(target_list, source_list, lambda i: label("targets", i),
                    lambda j: label("sources", j), own_source_allowed=True)


def _check_disjoint(target_list: list, source_list: list, target_label, source_label, *,
                    own_source_allowed: bool) -> None:
    """No two written tensors (``target_list``) share a byte, and none shares one with a read
    tensor (``source_list``) except, where ``own_source_allowed``, its own source as the very
    same view. ``target_label(i)`` / ``source_label(j)`` name them in the error."""
    target_extents = [_extent(t) for t in target_list]
    source_extents = [_extent(s) for s in source_list]
    # sort by start so that only neighbours in address order need comparing pairwise
    order = sorted((e[0].type, e[0].index or 0, e[1], e[2], i)
                   for i, e in enumerate(target_extents) if e is not None)
    for position, (*_, i) in enumerate(order):
        for *_, j in order[position + 1:]:
            ei, ej = target_extents[i], target_extents[j]
            if ej[:2] != ei[:2] or ej[2] >= ei[3]:
                break
            if _share_bytes(target_list[i], ei, target_list[j], ej):
                first, second = sorted((i, j))
                raise ValueError(f"{target_label(first)} and {target_label(second)} "
                                 f"overlap in memory (the same tensor twice, or views sharing "
                                 f"elements): an in-place update of both depends on thread timing")
    # Per storage, targets sorted by first byte: the ones a source range [a, b) can touch start
    # before b (bisection) and, walking back, stop once no earlier one ends after a (a running
    # maximum of end bytes: interleaved strided targets end out of order).
    by_storage: dict = {}
    for *_, i in order:
        by_storage.setdefault(target_extents[i][:2], []).append(i)
    starts, reach = {}, {}
    for key, members in by_storage.items():
        starts[key] = [target_extents[i][2] for i in members]
        reach[key] = list(itertools.accumulate((target_extents[i][3] for i in members), max))
    for j, extent in enumerate(source_extents):
        if extent is None or extent[:2] not in by_storage:
            continue
        members, furthest = by_storage[extent[:2]], reach[extent[:2]]
        position = bisect.bisect_left(starts[extent[:2]], extent[3]) - 1
        while position >= 0 and furthest[position] > extent[2]:
            i = members[position]
            position -= 1
            if own_source_allowed and i == j and _same_view(target_list[i], source_list[j]):
                continue  # a target that is its own source: a no-op, allowed
            if _share_bytes(target_list[i], target_extents[i], source_list[j], extent):
                raise ValueError(f"{target_label(i)} overlaps {source_label(j)} in "
                                 f"memory: an update would read elements it has already written"
                                 + (" (only a target that is its own source, the same view, is "
                                    "allowed)" if own_source_allowed else ""))


def _by_device(*lists) -> dict:
    """device -> the lists' entries whose first tensor is on it (as lists, in order)."""
    groups: dict = {}
    for entries in zip(*lists):
        device_lists = groups.setdefault(entries[0].device, tuple([] for _ in lists))
        for device_list, tensor in zip(device_lists, entries):
            device_list.append(tensor)
    return groups


def _apply(kind: str, targets, sources, scalar: float, backend: str, include_buffers: bool) -> None:
    target_list, source_list = _pairs(targets, sources, include_buffers)
    for device_targets, device_sources in _by_device(target_list, source_list).values():
        # the multi-tensor kernels take contiguous float32/bfloat16/float16 tensors: the backend
        # table sends other lists to eager (or refuses a named kernel backend)
        implementation = backends.implementation("weights", backend, *device_targets,
                                                 *device_sources, contiguous=True)
        with torch.no_grad():
            implementation.apply_(kind, device_targets, device_sources, scalar)


def _check_fraction(name: str, value, low_open: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > 1 or (low_open and value == 0):
        bound = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def ema_(targets: TensorsOrModule, sources: TensorsOrModule, decay: float, *,
         include_buffers: bool = False, backend: str = "auto") -> None:
    """In place: ``t = decay * t + (1 - decay) * s`` for every pair (parameters of modules,
    paired by name), computed as ``t + w * (s - t)`` with ``w = 1 - decay`` in float64, so the
    update keeps fp32 accuracy at decay 0.999999."""
    # The one place ema becomes lerp: 1 - decay in float64 here, so the backends implement only
    # lerp (the form decay*t + (1-decay)*s would lose fp32 accuracy as 1/(1 - decay)).
    weight = 1.0 - _check_fraction("decay", decay, False)
    _apply("lerp", targets, sources, weight, backend, include_buffers)


def lerp_(targets: TensorsOrModule, sources: TensorsOrModule, weight: float, *,
          include_buffers: bool = False, backend: str = "auto") -> None:
    """In place: ``t = t + weight * (s - t)`` (the TR-DPO soft update with weight = alpha)."""
    _apply("lerp", targets, sources, _check_fraction("weight", weight, False), backend, include_buffers)


def copy_(targets: TensorsOrModule, sources: TensorsOrModule, *, include_buffers: bool = False,
          backend: str = "auto") -> None:
    """In place: ``t = s`` for every pair (TR hard update, Elastic Reset)."""
    _apply("copy", targets, sources, 0.0, backend, include_buffers)


_BEMA_ROLES = ("targets", "emas", "params", "inits")


def _bema_lists(targets, emas, params, inits) -> list[list]:
    """The four lists, checked: one length, floating tensors of one shape and device per index,
    ema and init of one dtype, the written ones (targets, emas) disjoint from each other and
    from the read ones (params, inits)."""
    lists = [_as_tensor_list(role, given, False)
             for role, given in zip(_BEMA_ROLES, (targets, emas, params, inits))]
    lengths = [len(values) for values in lists]
    if len(set(lengths)) > 1:
        raise ValueError(f"bema_ takes lists of one length, got "
                         f"{dict(zip(_BEMA_ROLES, lengths))}")
    for i, group in enumerate(zip(*lists)):
        for role, tensor in zip(_BEMA_ROLES, group):
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"{role}[{i}]: weight ops take floating tensors, got {tensor.dtype}")
            if tensor.shape != group[0].shape or tensor.device != group[0].device:
                raise ValueError(f"{role}[{i}]: shape {tuple(tensor.shape)} on {tensor.device}, "
                                 f"but targets[{i}] is {tuple(group[0].shape)} on {group[0].device}")
        if group[1].dtype != group[3].dtype:
            raise TypeError(f"emas[{i}] and inits[{i}] must share a dtype (the BEMA state), got "
                            f"{group[1].dtype} and {group[3].dtype}")
    count = lengths[0]
    written, read = lists[0] + lists[1], lists[2] + lists[3]

    def label(roles):
        return lambda k: f"{roles[k // count]}[{k % count}]"
    _check_disjoint(written, read, label(_BEMA_ROLES[:2]), label(_BEMA_ROLES[2:]),
                    own_source_allowed=False)
    return lists


def bema_(targets: TensorsOrModule, emas: TensorsOrModule, params: TensorsOrModule,
          inits: TensorsOrModule, *, alpha: float, beta: float, backend: str = "auto") -> None:
    """BEMA's update (docs/algorithms.md "BEMA") in place, one pass over each element:
    ``ema = ema + beta * (param - ema)`` (TRL's ``(1 - beta) * ema + beta * param``, two-sided
    as torch.lerp) stored in the ema's dtype, then ``target = ema + alpha * (param - init)``
    from that stored ema. Lists paired by position (a module gives its parameters in
    registration order); each index's four tensors share shape and device, ema and init share a
    dtype, and targets may differ in dtype from both (a bf16 reference of an fp32 state).
    ``alpha`` finite, ``beta`` in [0, 1]. pyalign.refmodel.BEMA schedules the two."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    beta = _check_fraction("beta", beta, False)
    lists = _bema_lists(targets, emas, params, inits)
    for device_lists in _by_device(*lists).values():
        tensors = [t for device_list in device_lists for t in device_list]
        implementation = backends.implementation("weights", backend, *tensors, contiguous=True,
                                                 primitive="bema_")
        with torch.no_grad():
            implementation.bema_(*device_lists, alpha, beta)
