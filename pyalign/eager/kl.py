"""Eager per-token KL estimators: the reference implementation of the ``kl`` family.

The family's contract (every backend's primitives):

forward(logprobs, ref_logprobs, mask | None, estimator) -> kl (f32)
backward(grad_kl, logprobs, ref_logprobs, mask | None, estimator)
    -> (grad_logprobs, grad_ref_logprobs)

k1, k2 and k3 of d = ref_logprobs - logprobs, in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch

from pyalign._utils import accumulation_dtype

PRIMITIVES = ("forward", "backward")


def _k3_series(diff):
    """expm1(d) - d = d^2/2 + d^3/6 + ... + d^8/8!, accurate to 1e-11 relative for |d| < 1/8."""
    coefficient = torch.full_like(diff, 1.0 / math.factorial(8))
    for order in range(7, 1, -1):
        coefficient = coefficient * diff + 1.0 / math.factorial(order)
    return coefficient * diff * diff


def forward(logprobs, ref_logprobs, mask, estimator):
    acc = accumulation_dtype(logprobs, ref_logprobs)
    diff = ref_logprobs.to(acc) - logprobs.to(acc)  # d = ref_logp - logp
    if estimator == "k1":
        kl = -diff
    elif estimator == "k2":
        kl = 0.5 * diff * diff
    else:  # k3 = expm1(d) - d, which cancels in fp32 for small |d|: the series there
        kl = torch.where(diff.abs() < 0.125, _k3_series(diff), torch.expm1(diff) - diff)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl


def backward(grad_kl, logprobs, ref_logprobs, mask, estimator):
    acc = accumulation_dtype(logprobs, ref_logprobs)
    diff = ref_logprobs.to(acc) - logprobs.to(acc)
    if estimator == "k1":
        d_kl_d_diff = torch.full_like(diff, -1.0)
    elif estimator == "k2":
        d_kl_d_diff = diff
    else:
        d_kl_d_diff = torch.expm1(diff)
    grad_diff = grad_kl.to(acc) * d_kl_d_diff
    if mask is not None:
        grad_diff = torch.where(mask, grad_diff, torch.zeros_like(grad_diff))
    return (-grad_diff).to(logprobs.dtype), grad_diff.to(ref_logprobs.dtype)
