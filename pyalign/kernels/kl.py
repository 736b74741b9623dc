"""Per-token KL estimators between policy and reference log-probs, elementwise.

With d = ref_logprobs - logprobs (fp32 math):
    k1 = -d            dk1/dd = -1
    k2 = d^2 / 2       dk2/dd = d
    k3 = exp(d)-d-1    dk3/dd = expm1(d)
grad_logprobs = -grad_kl * dk/dd, grad_ref_logprobs = grad_kl * dk/dd; positions where the
(optional, bool) mask is False give 0 and zero gradient (a NaN there does not leak). k3 and
expm1 use a series for |d| < 1/2, so tiny differences keep full relative precision (eager's
exp(d) - 1 - d loses it all at |d| ~ 1e-4).

Memory traffic for n tokens: forward reads 2*4n (+n mask) bytes and writes 4n; backward reads
3*4n (+n) and writes 2*4n: one pass each, as eager's fused-by-hand best (eager runs 3-5 kernels
with fp32 temporaries). FLOPs ~10 per token (k3: ~20). Launch grid: (cdiv(n, BLOCK),).
Its cost on a GPU beside the other families' (launch-bound: microseconds): docs/gpu.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels
from pyalign import losses

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def k3_and_expm1(diff):
    """(exp(d) - d - 1, exp(d) - 1) without cancellation near d = 0."""
    # (e^d - 1 - d) / d^2 = 1/2! + d/3! + ... + d^8/10!; 10 terms reach fp32 precision at |d| 1/2
    series = 1.0 / 3628800.0
    series = series * diff + 1.0 / 362880.0
    series = series * diff + 1.0 / 40320.0
    series = series * diff + 1.0 / 5040.0
    series = series * diff + 1.0 / 720.0
    series = series * diff + 1.0 / 120.0
    series = series * diff + 1.0 / 24.0
    series = series * diff + 1.0 / 6.0
    series = series * diff + 0.5
    small = tl.abs(diff) < 0.5
    exp_diff = tl.exp(diff)
    k3 = tl.where(small, diff * diff * series, exp_diff - diff - 1.0)
    expm1 = tl.where(small, diff + diff * diff * series, exp_diff - 1.0)
    return k3, expm1


@triton.jit
def kl_forward_kernel(logprobs_ptr, ref_logprobs_ptr, mask_ptr, kl_ptr, numel,
                      ESTIMATOR: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    logprobs = tl.load(logprobs_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    ref_logprobs = tl.load(ref_logprobs_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    diff = ref_logprobs - logprobs
    if ESTIMATOR == 1:
        kl = -diff
    elif ESTIMATOR == 2:
        kl = 0.5 * diff * diff
    else:
        kl, _ = k3_and_expm1(diff)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=in_range, other=0) != 0
        kl = tl.where(keep, kl, 0.0)
    tl.store(kl_ptr + offs, kl, mask=in_range)


@triton.jit
def kl_backward_kernel(grad_kl_ptr, logprobs_ptr, ref_logprobs_ptr, mask_ptr, grad_logprobs_ptr,
                       grad_ref_logprobs_ptr, numel,
                       ESTIMATOR: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    grad_kl = tl.load(grad_kl_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if ESTIMATOR == 1:
        d_kl_d_diff = tl.zeros_like(grad_kl) - 1.0
    else:
        logprobs = tl.load(logprobs_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        ref_logprobs = tl.load(ref_logprobs_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        diff = ref_logprobs - logprobs
        if ESTIMATOR == 2:
            d_kl_d_diff = diff
        else:
            _, d_kl_d_diff = k3_and_expm1(diff)
    grad_diff = grad_kl * d_kl_d_diff
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=in_range, other=0) != 0
        grad_diff = tl.where(keep, grad_diff, 0.0)
    tl.store(grad_logprobs_ptr + offs, -grad_diff, mask=in_range)
    tl.store(grad_ref_logprobs_ptr + offs, grad_diff, mask=in_range)


def _mask_flat(mask):
    # bytes, not i1: a bool load goes through a shared-memory layout conversion in Triton
    return None if mask is None else mask.reshape(-1).to(torch.bool).contiguous().view(torch.uint8)


def forward(logprobs, ref_logprobs, mask, estimator):
    """The kl family's forward (pyalign/eager/kl.py): kl (fp32) shaped like logprobs."""
    numel = logprobs.numel()
    logprobs_flat = _kernels.as_fp32_vector(logprobs)
    ref_flat = _kernels.as_fp32_vector(ref_logprobs)
    mask_flat = _mask_flat(mask)
    kl = _kernels.new_output(numel, torch.float32, logprobs.device)
    kl_forward_kernel[(triton.cdiv(numel, BLOCK),)](
        logprobs_flat, ref_flat, logprobs_flat if mask_flat is None else mask_flat, kl, numel,
        ESTIMATOR=losses.KL_ESTIMATOR_IDS[estimator], HAS_MASK=mask_flat is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return kl.view(logprobs.shape)


def backward(grad_kl, logprobs, ref_logprobs, mask, estimator):
    """The kl family's backward (pyalign/eager/kl.py): (grad_logprobs, grad_ref_logprobs) in the inputs'
    dtypes."""
    numel = logprobs.numel()
    logprobs_flat = _kernels.as_fp32_vector(logprobs)
    ref_flat = _kernels.as_fp32_vector(ref_logprobs)
    mask_flat = _mask_flat(mask)
    grad_flat = _kernels.as_fp32_vector(grad_kl)
    grad_logprobs = _kernels.new_output(numel, torch.float32, logprobs.device)
    grad_ref = _kernels.new_output(numel, torch.float32, logprobs.device)
    kl_backward_kernel[(triton.cdiv(numel, BLOCK),)](
        grad_flat, logprobs_flat, ref_flat, grad_flat if mask_flat is None else mask_flat,
        grad_logprobs, grad_ref, numel,
        ESTIMATOR=losses.KL_ESTIMATOR_IDS[estimator], HAS_MASK=mask_flat is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return (grad_logprobs.view(logprobs.shape).to(logprobs.dtype),
            grad_ref.view(ref_logprobs.shape).to(ref_logprobs.dtype))


def compile_configs():
    configs = []
    for estimator, estimator_id in losses.KL_ESTIMATOR_IDS.items():
        for has_mask in (False, True):
            # without a mask the launch passes an fp32 tensor in its place
            mask = {"mask_ptr": "*u8" if has_mask else "*fp32"}
            constexprs = {"ESTIMATOR": estimator_id, "HAS_MASK": has_mask, "BLOCK": BLOCK}
            for kernel, name in ((kl_forward_kernel, "kl_forward"),
                                 (kl_backward_kernel, "kl_backward")):
                configs.append(_kernels.compile_config(
                    kernel, name, f"{estimator} mask={has_mask}", NUM_WARPS, constexprs,
                    types=mask, aligned_scalars=("numel",)))
    return configs
