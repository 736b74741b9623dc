"""Triton kernels for pyalign, one module per op family.

Each module holds the ``@triton.jit`` kernels, their launch wrappers (the primitive functions of
their family's contract, pyalign/eager/<family>.py) and ``compile_configs()``: every (kernel,
signature, constexprs, num_warps) its wrappers can launch, each built by ``compile_config`` from
the kernel's own argument list, which pyalign/compile_check.py compiles ahead of time for sm_80
and sm_90. A module is the Triton implementation of the family it is named after
(pyalign/_triton_backend.py).

Helpers shared by the wrappers live here.
"""
from __future__ import annotations

import torch

from pyalign._utils import KERNEL_DTYPES

# Tests set this to True so that every output buffer starts NaN-filled: an element a kernel
# forgets to write then shows up as NaN instead of a plausible leftover value.
POISON_OUTPUTS = False

# Triton's name of each dtype the kernels take: exactly pyalign._utils.KERNEL_DTYPES.
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
assert tuple(TRITON_DTYPE_NAMES) == KERNEL_DTYPES, "TRITON_DTYPE_NAMES must name KERNEL_DTYPES"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer every element of which the kernel is expected to write."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def as_fp32_vector(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 1-D view or copy. Per-token vectors are tiny next to the logits, and one
    fp32 layout keeps the compiled kernel variants few."""
    return tensor.reshape(-1).to(torch.float32).contiguous()


def backward_row_vectors(grad_logprobs, grad_entropy, stats, entropy):
    """The per-row fp32 vectors a log-prob backward kernel reads: (grad_logprobs, grad_entropy,
    stats, entropy), the entropy pair None when no entropy gradient flows; the [N, 2] row stats
    (max, log sum exp) come flattened, row n at 2n and 2n + 1."""
    if grad_entropy is not None:
        grad_entropy, entropy = as_fp32_vector(grad_entropy), as_fp32_vector(entropy)
    return as_fp32_vector(grad_logprobs), grad_entropy, as_fp32_vector(stats), entropy


def compile_config(kernel, name: str, label: str, num_warps: int, constexprs: dict, *,
                   types: dict | None = None, unaligned: tuple = (),
                   aligned_scalars: tuple = ()) -> dict:
    """One entry of a kernel module's ``compile_configs()``. The signature is every argument of
    ``kernel`` that ``constexprs`` does not fix, in its order: a pointer (``*_ptr``) is
    ``*fp32`` and a scalar ``i32`` unless ``types`` names another type. Every pointer but the
    ``unaligned`` ones, and the ``aligned_scalars`` (sizes and strides), are 16-byte aligned /
    divisible by 16, as the JIT specializes them for torch's allocations."""
    types = types or {}
    names = [arg for arg in kernel.arg_names if arg not in constexprs]
    unknown = set(types) | set(unaligned) | set(aligned_scalars)
    assert unknown <= set(names), f"{name}: not arguments of the kernel: {unknown - set(names)}"
    signature = {arg: types.get(arg, "*fp32" if arg.endswith("_ptr") else "i32") for arg in names}
    aligned = tuple(arg for arg in names if (arg.endswith("_ptr") and arg not in unaligned)
                    or arg in aligned_scalars)
    return dict(name=name, kernel=kernel, signature=signature, constexprs=constexprs,
                aligned=aligned, num_warps=num_warps, label=label)
