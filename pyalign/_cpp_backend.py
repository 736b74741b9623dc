"""Registers the C++/CUDA extension (csrc/, built by pyalign/_build.py) in the backend table.

Imported by pyalign/backends.py at import time, like pyalign/_triton_backend.py. Importing it is
cheap: it registers lazy loaders only; the first op that needs one builds (or loads from the
cache) the extension. ``cpu`` backend: logprobs, linear_logprobs (torch matmuls with the C++
logprobs kernels as the chunk epilogue), kl, policy and weights; ``cuda`` backend: weights.

The adapters below turn ``torch.ops.pyalign_C`` into the primitive contract of
pyalign/backends.py. float64 and empty inputs never reach them (the backend table sends those to
eager); what remains is per-tensor routing: a mixed weight list is split into kernel-eligible and
eager tensors.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pyalign import _build, backends
from pyalign._utils import KERNEL_DTYPES


def _eager(family: str):
    return backends.load(family, "eager")


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


def _make_linear_logprobs(ops):
    from pyalign.eager.linear_logprobs import make_chunked_linear

    # The matmuls stay in torch (MKL); the CPU logprobs kernels are the chunk epilogue.
    return make_chunked_linear(_make_logprobs(ops))


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


def _make_policy(ops):
    # The kernels read contiguous fp32 per-token inputs (advantages too: a [B] one is expanded)
    # and bool masks; the gradients come back in fp32 and are cast to the inputs' dtypes here.
    # The policy term and the KL estimator go by the registry's ids (pyalign/losses.py).
    from pyalign import losses

    term_ids = losses.policy_kernel_ids()

    def fp32(tensor):
        return None if tensor is None else tensor.to(torch.float32).contiguous()

    def per_token(advantages, logprobs):
        return fp32(advantages[:, None].expand_as(logprobs) if advantages.dim() == 1 else advantages)

    def forward(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, entropy,
                loss, level, params, beta, kl_estimator, bias_correction):
        return ops.policy_forward(fp32(logprobs), fp32(old_logprobs),
                                  per_token(advantages, logprobs), mask, entropy_mask,
                                  fp32(ref_logprobs), fp32(entropy), term_ids[loss], level,
                                  [float(v) for v in params],
                                  losses.POLICY_KL_ESTIMATOR_IDS[kl_estimator],
                                  bool(bias_correction))

    def backward(row_weights, entropy_weights, logprobs, old_logprobs, advantages, mask,
                 entropy_mask, ref_logprobs, entropy, loss, level, params, beta, kl_estimator,
                 bias_correction):
        with_entropy = entropy is not None and entropy_weights is not None
        grad, grad_entropy = ops.policy_backward(
            fp32(row_weights), fp32(entropy_weights) if with_entropy else None, fp32(logprobs),
            fp32(old_logprobs), per_token(advantages, logprobs), mask, entropy_mask,
            fp32(ref_logprobs), term_ids[loss], level, [float(v) for v in params], float(beta),
            losses.POLICY_KL_ESTIMATOR_IDS[kl_estimator], bool(bias_correction))
        return (grad.to(logprobs.dtype),
                grad_entropy.to(entropy.dtype) if with_entropy else None)

    return SimpleNamespace(forward=forward, backward=backward)


def _make_weights(ops, device_type: str):
    def apply_(kind, targets, sources, scalar):
        fast_targets, fast_sources, rest_targets, rest_sources = [], [], [], []
        for target, source in zip(targets, sources, strict=True):
            fast = (target.device.type == device_type and source.device == target.device
                    and target.dtype in KERNEL_DTYPES and source.dtype in KERNEL_DTYPES
                    and target.is_contiguous() and source.is_contiguous())
            (fast_targets if fast else rest_targets).append(target)
            (fast_sources if fast else rest_sources).append(source)
        if fast_targets:
            ops.multi_tensor_apply_(kind, fast_targets, fast_sources, float(scalar))
        if rest_targets:  # fp64, non-contiguous views: the eager path
            _eager("weights").apply_(kind, rest_targets, rest_sources, scalar)

    def bema_(targets, emas, params, inits, alpha, beta):
        fast, rest = ([], [], [], []), ([], [], [], [])
        for group in zip(targets, emas, params, inits, strict=True):
            ready = (all(t.device == group[0].device and t.dtype in KERNEL_DTYPES
                         and t.is_contiguous() for t in group)
                     and group[0].device.type == device_type and group[1].dtype == group[3].dtype)
            for kept, tensor in zip(fast if ready else rest, group):
                kept.append(tensor)
        if fast[0]:
            ops.multi_tensor_bema_(*fast, float(alpha), float(beta))
        if rest[0]:  # fp64, non-contiguous views: the eager path
            _eager("weights").bema_(*rest, alpha, beta)

    return SimpleNamespace(apply_=apply_, bema_=bema_)


def _make_cpu_weights(ops):
    return _make_weights(ops, "cpu")


def _make_cuda_weights(ops):
    return _make_weights(ops, "cuda")


# {family: factory taking torch.ops.pyalign_C}, per backend, with the loader of its ops.
CPU_FACTORIES = {
    "logprobs": _make_logprobs,
    "linear_logprobs": _make_linear_logprobs,
    "kl": _make_kl,
    "policy": _make_policy,
    "weights": _make_cpu_weights,
}
CUDA_FACTORIES = {
    "weights": _make_cuda_weights,
}
BACKEND_FACTORIES = {
    "cpu": (lambda: _build.load_cpu_ops(), CPU_FACTORIES),
    "cuda": (lambda: _build.load_cuda_ops(), CUDA_FACTORIES),
}


def _loader(load_ops, factory):
    def load_cpp_backend():
        return factory(load_ops())
    return load_cpp_backend


for _backend, (_load_ops, _factories) in BACKEND_FACTORIES.items():
    for _family, _factory in _factories.items():
        backends.register(_family, _backend, _loader(_load_ops, _factory))
