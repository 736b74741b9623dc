"""token_logprobs: per-token log-probability of the label (and optionally the entropy).

Public function -> autograd Function -> torch.library custom ops -> the backend table
(pyalign/backends.py, family "logprobs"). The custom ops make the call opaque to torch.compile,
so `torch.compile(fullgraph=True)` traces through it without a graph break; validation that
depends on data (labels in range) runs inside the op.
"""
from __future__ import annotations

from typing import Literal, Optional, Union, overload

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks


# The third output is the [N, 2] row stats (m, log-sum-exp); the op name says so, which also keeps
# compiled graphs cached for the former [N] lse from being reused.
@torch.library.custom_op("pyalign::token_logprobs_stats_fwd", mutates_args=())
def _token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        temperature: float, with_entropy: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.check_labels_in_range(labels, logits.shape[-1], ignore_index)
    logprobs, entropy, lse = backends.implementation("logprobs", backend, logits).forward(
        logits, labels, ignore_index, temperature, with_entropy)
    return logprobs, entropy, lse


@_token_logprobs_fwd.register_fake
def _(logits, labels, ignore_index, temperature, with_entropy, backend):
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows if with_entropy else 0, dtype=acc),
            logits.new_empty((rows, 2), dtype=acc))  # row stats (m, log sum exp)


@torch.library.custom_op("pyalign::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                        logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                        entropy: Optional[torch.Tensor], ignore_index: int, temperature: float,
                        backend: str) -> torch.Tensor:
    return backends.implementation("logprobs", backend, logits).backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature, False)


@_token_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("pyalign::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                                logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                entropy: Optional[torch.Tensor], ignore_index: int,
                                temperature: float, backend: str) -> None:
    backends.implementation("logprobs", backend, logits).backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature, True)


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V], labels [N] -> (logprobs [N], entropy [N] or [0]); grads for logits only."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, with_entropy, backend, inplace_backward):
        logprobs, entropy, lse = _token_logprobs_fwd(logits, labels, ignore_index, temperature,
                                                     with_entropy, backend)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.config = (ignore_index, temperature, with_entropy, backend, inplace_backward)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        ignore_index, temperature, with_entropy, backend, inplace_backward = ctx.config
        if grad_logprobs is None:
            grad_logprobs = lse.new_zeros(lse.shape[0])  # lse: the [N, 2] row stats
        if not with_entropy:
            grad_entropy, entropy = None, None
        args = (grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                logits, labels, lse, entropy, ignore_index, temperature, backend)
        if inplace_backward and not torch.compiler.is_compiling():
            _token_logprobs_bwd_inplace(*args)
            grad_logits = logits
        else:
            grad_logits = _token_logprobs_bwd(*args)
        return grad_logits, None, None, None, None, None, None


@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                   temperature: float = ..., entropy: Literal[False] = ..., backend: str = ...,
                   inplace_backward: bool = ...) -> torch.Tensor: ...
@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                   temperature: float = ..., entropy: Literal[True], backend: str = ...,
                   inplace_backward: bool = ...) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                   temperature: float = ..., entropy: bool, backend: str = ...,
                   inplace_backward: bool = ...
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, entropy: bool = False, backend: str = "auto",
                   inplace_backward: bool = False
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of each label under softmax(logits / temperature), in fp32.

    logits: [..., V] float32/bfloat16/float16; labels: [...] integer ids. Positions whose label is
    ``ignore_index`` give 0 and get zero gradient. With ``entropy=True`` returns
    ``(logprobs, entropy)`` where entropy is that of softmax(logits / temperature).

    ``inplace_backward=True`` writes the gradient into the logits buffer during backward (no
    second [N, V] tensor); use it only when nothing else needs the logits afterwards.
    """
    _checks.check_tensor("logits", logits, floating=True)
    _checks.check_tensor("labels", labels, integer=True)
    _checks.check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(logits.shape)}")
    _checks.check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    temperature = _checks.check_positive("temperature", temperature)
    ignore_index = int(ignore_index)
    vocab = logits.shape[-1]
    backends.check_name(backend)
    logits_2d = logits if logits.stride(-1) == 1 else logits.contiguous()
    logits_2d = logits_2d.reshape(-1, vocab)
    labels_1d = labels.reshape(-1).to(torch.int64)
    logprobs, entropy_out = TokenLogprobsFunction.apply(logits_2d, labels_1d, ignore_index,
                                                        temperature, bool(entropy), backend,
                                                        bool(inplace_backward))
    logprobs = logprobs.view(labels.shape)
    if entropy:
        return logprobs, entropy_out.view(labels.shape)
    return logprobs
