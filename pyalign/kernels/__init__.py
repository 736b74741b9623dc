"""Triton kernels for pyalign, one module per op family.

Each module holds the ``@triton.jit`` kernels, their launch wrappers (the primitive functions of
their family's contract, pyalign/eager/<family>.py) and ``COMPILE_CONFIGS``: every (kernel, signature,
constexprs, num_warps) its wrappers can launch, which pyalign/compile_check.py compiles ahead of
time for sm_80 and sm_90.

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
