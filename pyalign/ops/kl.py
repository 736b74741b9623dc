"""kl_penalty: per-token KL estimators between the policy and the reference at sampled tokens.

With d = ref_logprobs - logprobs: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (non-negative,
unbiased for KL(policy || ref)). Masked positions give 0 and zero gradient. Gradients flow to
both log-prob tensors. Family "kl" of pyalign/backends.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyalign import backends, losses
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks


@torch.library.custom_op("pyalign::kl_penalty_fwd", mutates_args=())
def _kl_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: Optional[torch.Tensor],
            estimator: str, backend: str) -> torch.Tensor:
    impl = backends.implementation("kl", backend, logprobs, ref_logprobs)
    return impl.forward(logprobs, ref_logprobs, mask, estimator)


@_kl_fwd.register_fake
def _(logprobs, ref_logprobs, mask, estimator, backend):
    acc = accumulation_dtype(logprobs, ref_logprobs)
    return logprobs.new_empty(logprobs.shape, dtype=acc)


@torch.library.custom_op("pyalign::kl_penalty_bwd", mutates_args=())
def _kl_bwd(grad_kl: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
            mask: Optional[torch.Tensor], estimator: str, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementation("kl", backend, logprobs, ref_logprobs)
    return impl.backward(grad_kl, logprobs, ref_logprobs, mask, estimator)


@_kl_bwd.register_fake
def _(grad_kl, logprobs, ref_logprobs, mask, estimator, backend):
    return torch.empty_like(logprobs), torch.empty_like(ref_logprobs)


class KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, mask, estimator, backend):
        ctx.save_for_backward(logprobs, ref_logprobs, mask)
        ctx.config = (estimator, backend)
        return _kl_fwd(logprobs, ref_logprobs, mask, estimator, backend)

    @staticmethod
    def backward(ctx, grad_kl):
        logprobs, ref_logprobs, mask = ctx.saved_tensors
        estimator, backend = ctx.config
        grad_logprobs, grad_ref = _kl_bwd(grad_kl.contiguous(), logprobs, ref_logprobs, mask,
                                          estimator, backend)
        return grad_logprobs, grad_ref, None, None, None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate (fp32, shaped like ``logprobs``); where ``mask`` is False the result and
    both gradients are exactly 0, whatever the inputs hold there (NaN, inf).

    ``logprobs`` and ``ref_logprobs``: floating tensors of one shape (no broadcasting); ``mask``:
    that shape too, bool or of any dtype holding only 0 and 1 (other values are refused, named);
    ``estimator``: one of "k1", "k2", "k3".
    """
    _checks.check_tensor("logprobs", logprobs, floating=True)
    _checks.check_tensor("ref_logprobs", ref_logprobs, floating=True)
    _checks.check_choice("estimator", estimator, tuple(losses.KL_ESTIMATOR_IDS))
    if mask is not None:
        mask = _checks.check_mask("mask", mask)
    _checks.check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _checks.check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    if mask is not None:
        _checks.check_shape("mask", mask, logprobs.shape, "logprobs.shape")
        mask = mask.to(torch.bool).contiguous()
    backends.check_name(backend)
    return KLPenaltyFunction.apply(logprobs.contiguous(), ref_logprobs.contiguous(), mask,
                                   estimator, backend)
