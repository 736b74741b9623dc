"""Registers the C++/CUDA extension (csrc/, built by pyalign/_build.py) in the backend table.

Imported by pyalign/backends.py at import time, like pyalign/_triton_backend.py. Importing it is
cheap: it registers lazy loaders only; the first op that needs one builds (or loads from the
cache) the extension. ``cpu`` backend: logprobs, linear_logprobs (the chunked head,
pyalign/_chunked_head.py, with the C++ logprobs kernels as its epilogue), kl, policy and weights;
``cuda`` backend: weights.

Each adapter below turns ``torch.ops.pyalign_C`` into the primitive contract of its family
(pyalign/eager/<family>.py) and is registered by ``@implements(backend, family)``: adding a
family to a C++ backend is one decorated factory. float64, empty and (weights) strided inputs
never reach them: the backend table sends those to eager.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pyalign import _build, backends
from pyalign._chunked_head import ChunkedHead

# How each C++ backend loads torch.ops.pyalign_C (building the extension on first use).
OPS_LOADERS = {"cpu": lambda: _build.load_cpu_ops(), "cuda": lambda: _build.load_cuda_ops()}


def implements(backend: str, family: str):
    """Register the decorated factory (torch.ops.pyalign_C -> the family's implementation object)
    as ``backend``'s implementation of ``family``, loaded on first use."""
    load_ops = OPS_LOADERS[backend]

    def decorate(factory):
        backends.register(family, backend, lambda: factory(load_ops()))
        return factory
    return decorate


@implements("cpu", "logprobs")
def _make_logprobs(ops):
    def forward(logits, labels, ignore_index, temperature, with_entropy):
        return ops.logprobs_forward(logits, labels, int(ignore_index), float(temperature),
                                    bool(with_entropy))

    def backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                 temperature, inplace):
        args = (grad_logprobs, grad_entropy, logits, labels, stats, entropy, int(ignore_index),
                float(temperature))
        if inplace and logits.dim() == 2 and logits.stride(-1) == 1:
            ops.logprobs_backward_(*args)
            return logits
        grad_logits = ops.logprobs_backward(*args)
        if inplace:
            logits.copy_(grad_logits)
            return logits
        return grad_logits

    def backward_columns(grad_logprobs, grad_entropy, logits, labels, stats, entropy,
                         ignore_index, temperature, column_start):
        ops.logprobs_backward_columns_(grad_logprobs, grad_entropy, logits, labels, stats,
                                       entropy, int(ignore_index), float(temperature),
                                       int(column_start))
        return logits

    return SimpleNamespace(forward=forward, backward=backward, backward_columns=backward_columns)


@implements("cpu", "linear_logprobs")
def _make_linear_logprobs(ops):
    # The matmuls stay in torch (MKL); the CPU logprobs kernels are the slices' epilogue.
    return ChunkedHead(_make_logprobs(ops))


@implements("cpu", "kl")
def _make_kl(ops):
    # kl_penalty takes inputs and mask of one shape only (pyalign/ops/kl.py), so every call fits
    # the kernels; an integer mask becomes the bool mask they read.
    def forward(logprobs, ref_logprobs, mask, estimator):
        mask = None if mask is None else mask.to(torch.bool)
        return ops.kl_forward(logprobs, ref_logprobs, mask, estimator)

    def backward(grad_kl, logprobs, ref_logprobs, mask, estimator):
        mask = None if mask is None else mask.to(torch.bool)
        return ops.kl_backward(grad_kl, logprobs, ref_logprobs, mask, estimator)

    return SimpleNamespace(forward=forward, backward=backward)


@implements("cpu", "policy")
def _make_policy(ops):
    # The kernels read contiguous fp32 per-token inputs (advantages too: a [B] one is expanded)
    # and bool masks; the gradients come back in fp32 and are cast to the inputs' dtypes here.
    # The policy term and the KL estimator go by the registry's ids (pyalign/losses.py).
    from pyalign import losses

    if ops.policy_num_stats() != len(losses.POLICY_ROW_STATS):
        raise RuntimeError(f"the C++ policy kernels write {ops.policy_num_stats()} row stats, "
                           f"pyalign.losses.POLICY_ROW_STATS names {len(losses.POLICY_ROW_STATS)} "
                           f"(csrc/common/policy_stats.h)")
    term_ids = losses.policy_kernel_ids()

    def fp32(tensor):
        return None if tensor is None else tensor.to(torch.float32).contiguous()

    def per_token(advantages, logprobs):
        return fp32(advantages[:, None].expand_as(logprobs) if advantages.dim() == 1 else advantages)

    def forward(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, entropy,
                policy_weights, sampler_log_weights, loss, level, params, beta, kl_estimator,
                bias_correction):
        return ops.policy_forward(fp32(logprobs), fp32(old_logprobs),
                                  per_token(advantages, logprobs), mask, entropy_mask,
                                  fp32(ref_logprobs), fp32(entropy), fp32(policy_weights),
                                  fp32(sampler_log_weights), term_ids[loss], level,
                                  [float(v) for v in params],
                                  losses.KL_ESTIMATOR_IDS[kl_estimator], bool(bias_correction))

    def backward(row_weights, entropy_weights, logprobs, old_logprobs, advantages, mask,
                 entropy_mask, ref_logprobs, entropy, policy_weights, sampler_log_weights, loss,
                 level, params, beta, kl_estimator, bias_correction):
        with_entropy = entropy is not None and entropy_weights is not None
        grad, grad_entropy = ops.policy_backward(
            fp32(row_weights), fp32(entropy_weights) if with_entropy else None, fp32(logprobs),
            fp32(old_logprobs), per_token(advantages, logprobs), mask, entropy_mask,
            fp32(ref_logprobs), fp32(policy_weights), fp32(sampler_log_weights), term_ids[loss],
            level, [float(v) for v in params], float(beta),
            losses.KL_ESTIMATOR_IDS[kl_estimator], bool(bias_correction))
        return (grad.to(logprobs.dtype),
                grad_entropy.to(entropy.dtype) if with_entropy else None)

    return SimpleNamespace(forward=forward, backward=backward)


@implements("cpu", "weights")
@implements("cuda", "weights")
def _make_weights(ops):
    def apply_(kind, targets, sources, scalar):
        ops.multi_tensor_apply_(kind, list(targets), list(sources), float(scalar))

    def bema_(targets, emas, params, inits, alpha, beta):
        ops.multi_tensor_bema_(list(targets), list(emas), list(params), list(inits), float(alpha),
                               float(beta))

    return SimpleNamespace(apply_=apply_, bema_=bema_)
