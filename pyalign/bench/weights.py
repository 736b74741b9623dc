"""The weights cases: ema_ / lerp_ / copy_ in place over model-like tensors, pyalign on every
available backend vs torch._foreach_lerp_ and a per-tensor Tensor.lerp_ loop; and BEMA's update
(pyalign.bema_: the fused kernels beside their eager form) vs TRL's BEMACallback arithmetic, a
per-tensor loop. Each against the floor of one Tensor.copy_ of the same bytes, with a GB/s
column."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import benchmark_backends, dtype_name, seeded_generator
from pyalign.bench.harness import Candidate, Case


def model_like_shapes(total_params: int, num_tensors: int = 200) -> list[tuple[int, ...]]:
    """Shapes of a transformer-like stack: per layer q, k, v, o [d, d], up [4d, d],
    down [d, 4d] and two norms [d]; d picked so the total is about ``total_params``."""
    layers = max(1, num_tensors // 8)
    width = max(8, int(round((total_params / (12 * layers)) ** 0.5 / 8)) * 8)
    shapes = []
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,), (width,)]
    return shapes


def weights_case(total_params: int = 20_000_000, device="cpu", *, num_tensors: int = 200,
                 target_dtype=torch.float32, source_dtype=torch.float32,
                 decay: float = 0.99, weight: float = 0.6) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 5)
    shapes = model_like_shapes(total_params, num_tensors)
    targets = [torch.randn(s, device=device, generator=generator).to(target_dtype) for s in shapes]
    sources = [torch.randn(s, device=device, generator=generator).to(source_dtype) for s in shapes]
    numel = sum(t.numel() for t in targets)
    target_bytes = numel * targets[0].element_size()
    source_bytes = numel * sources[0].element_size()
    update_bytes = 2 * target_bytes + source_bytes  # read target and source, write target
    copy_bytes = target_bytes + source_bytes
    candidates = []
    names, notes = benchmark_backends("weights", device)
    for name in names:
        candidates.append(Candidate(f"pyalign.ema_ [{name}]",
                                    lambda name=name: pyalign.ema_(targets, sources, decay,
                                                                   backend=name),
                                    backend=name, bytes_moved=update_bytes))
        candidates.append(Candidate(f"pyalign.lerp_ [{name}]",
                                    lambda name=name: pyalign.lerp_(targets, sources, weight,
                                                                    backend=name),
                                    backend=name, bytes_moved=update_bytes))
        candidates.append(Candidate(f"pyalign.copy_ [{name}]",
                                    lambda name=name: pyalign.copy_(targets, sources,
                                                                    backend=name),
                                    backend=name, bytes_moved=copy_bytes))
    if target_dtype == source_dtype:
        candidates.append(Candidate("torch._foreach_lerp_",
                                    lambda: torch._foreach_lerp_(targets, sources, weight),
                                    kind="baseline", bytes_moved=update_bytes))
    else:
        notes.append("torch._foreach_lerp_ needs equal dtypes: not run")

    def loop():
        with torch.no_grad():
            for target, source in zip(targets, sources, strict=True):
                target.lerp_(source.to(target.dtype), weight)
    candidates.append(Candidate("eager loop Tensor.lerp_", loop, kind="baseline",
                                bytes_moved=update_bytes))
    flat_target = torch.empty(numel, device=device, dtype=target_dtype)
    flat_source = torch.randn(numel, device=device, generator=generator).to(source_dtype)
    candidates.append(Candidate("floor: one Tensor.copy_ of the same bytes",
                                lambda: flat_target.copy_(flat_source), kind="floor",
                                bytes_moved=copy_bytes))
    notes.append("GB/s = bytes moved / median time: ema_/lerp_ read target and source and "
                 "write target; copy reads source and writes target")
    ratio_to = {"vs loop": "eager loop Tensor.lerp_"}
    if target_dtype == source_dtype:
        ratio_to["vs foreach"] = "torch._foreach_lerp_"
    return Case("weights ema_/lerp_/copy_ (in place, no autograd)",
                {"tensors": len(shapes), "params": numel, "target": dtype_name(target_dtype),
                 "source": dtype_name(source_dtype), "device": device.type},
                candidates, ratio_to=ratio_to,
                floor="floor: one Tensor.copy_ of the same bytes", notes=notes)


def bema_case(total_params: int = 20_000_000, device="cpu", *, num_tensors: int = 200,
              target_dtype=torch.float32, state_dtype=torch.float32, param_dtype=torch.float32,
              alpha: float = 0.3, beta: float = 0.05) -> Case:
    """pyalign.bema_ (ema and the reference written from ema, param and init in one pass) on
    every backend, its eager form among them, beside TRL's BEMACallback arithmetic (per tensor:
    ema.mul_(1 - beta).add_(param, alpha=beta), ref.copy_(ema + alpha * (param - init)))."""
    device = torch.device(device)
    generator = seeded_generator(device, 6)
    shapes = model_like_shapes(total_params, num_tensors)

    def tensors(dtype):
        return [torch.randn(s, device=device, generator=generator).to(dtype) for s in shapes]
    targets, emas, params, inits = (tensors(target_dtype), tensors(state_dtype), tensors(param_dtype),
                                    tensors(state_dtype))
    numel = sum(t.numel() for t in targets)
    state_bytes = torch.empty((), dtype=state_dtype).element_size()
    # read ema, param, init; write ema and the reference
    bema_bytes = numel * (3 * state_bytes + targets[0].element_size() + params[0].element_size())
    candidates = []
    names, notes = benchmark_backends("weights", device)
    for name in names:
        candidates.append(Candidate(f"pyalign.bema_ [{name}]",
                                    lambda name=name: pyalign.bema_(targets, emas, params, inits,
                                                                    alpha=alpha, beta=beta,
                                                                    backend=name),
                                    backend=name, bytes_moved=bema_bytes))

    @torch.no_grad()
    def trl_loop():
        for target, ema, param, init in zip(targets, emas, params, inits, strict=True):
            ema.mul_(1 - beta).add_(param.to(ema.dtype), alpha=beta)
            target.copy_(ema + alpha * (param.to(ema.dtype) - init))
    candidates.append(Candidate("TRL BEMACallback arithmetic (per-tensor loop)", trl_loop,
                                kind="baseline", bytes_moved=bema_bytes))
    floor_numel = bema_bytes // 8  # an fp32 copy reads and writes 8 bytes per element
    flat_target = torch.empty(floor_numel, device=device)
    flat_source = torch.randn(floor_numel, device=device, generator=generator)
    candidates.append(Candidate("floor: one Tensor.copy_ of the same bytes",
                                lambda: flat_target.copy_(flat_source), kind="floor",
                                bytes_moved=bema_bytes))
    notes.append("GB/s = bytes moved / median time: bema_ reads ema, param and init and writes "
                 "ema and the reference")
    ratio_to = {"vs TRL loop": "TRL BEMACallback arithmetic (per-tensor loop)"}
    if "eager" in names:
        ratio_to["vs eager"] = "pyalign.bema_ [eager]"
    return Case("weights bema_ (BEMA update, in place, no autograd)",
                {"tensors": len(shapes), "params": numel, "target": dtype_name(target_dtype),
                 "state": dtype_name(state_dtype), "param": dtype_name(param_dtype),
                 "device": device.type},
                candidates, ratio_to=ratio_to,
                floor="floor: one Tensor.copy_ of the same bytes", notes=notes)
