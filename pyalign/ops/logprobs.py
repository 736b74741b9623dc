"""token_logprobs: per-token log-probability of the label (and optionally the entropy).

Public function -> autograd Function -> torch.library custom ops -> the backend table
(pyalign/backends.py, family "logprobs"). The custom ops make the call opaque to torch.compile,
so `torch.compile(fullgraph=True)` traces through it without a graph break; validation that
depends on data (labels in range) runs inside the op.
"""
from __future__ import annotations

import warnings
from typing import Literal, Optional, Union, overload

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks


# The third output is the [N, 2] row stats (m, log-sum-exp).
@torch.library.custom_op("pyalign::token_logprobs_stats_fwd", mutates_args=())
def _token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        temperature: float, with_entropy: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.check_labels_in_range(labels, logits.shape[-1], ignore_index)
    logprobs, entropy, stats = backends.implementation("logprobs", backend, logits).forward(
        logits, labels, ignore_index, temperature, with_entropy)
    return logprobs, entropy, stats


@_token_logprobs_fwd.register_fake
def _(logits, labels, ignore_index, temperature, with_entropy, backend):
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows if with_entropy else 0, dtype=acc),
            logits.new_empty((rows, 2), dtype=acc))  # row stats (m, log sum exp)


@torch.library.custom_op("pyalign::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                        logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                        entropy: Optional[torch.Tensor], ignore_index: int, temperature: float,
                        backend: str) -> torch.Tensor:
    return backends.implementation("logprobs", backend, logits).backward(
        grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index, temperature, False)


@_token_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index, temperature, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("pyalign::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                                logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                                entropy: Optional[torch.Tensor], ignore_index: int,
                                temperature: float, backend: str) -> None:
    backends.implementation("logprobs", backend, logits).backward(
        grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index, temperature, True)


_inplace_warned: set[str] = set()


def _inplace_backward_is_safe(logits_2d: torch.Tensor) -> bool:
    """Whether the backward may write the gradient into ``logits_2d`` ([N, V], unit last stride).

    No: where rows share memory (each write would clobber another row's gradient) or where the
    buffer belongs to a leaf (the caller's tensor, overwritten by its own gradient). A view of a
    non-leaf (``big[:, :V]``) is written in the view only; autograd's version counter catches an
    op that saved the buffer for its own backward. Under torch.compile the backward is
    out-of-place anyway.
    """
    if not logits_2d.requires_grad or torch.compiler.is_compiling():
        return True
    rows, vocab = logits_2d.shape
    if rows > 1 and logits_2d.stride(0) < vocab:
        kind = "shared rows"
        reason = (f"the logits' rows share memory (row stride {logits_2d.stride(0)} < vocabulary "
                  f"{vocab}: an expanded, stride-0 or overlapping view)")
    else:
        base = logits_2d._base if logits_2d._base is not None else logits_2d
        if not base.is_leaf:
            return True
        kind = "leaf"
        reason = ("the logits are a leaf tensor (or a view of one): writing the gradient into them "
                  "would overwrite the caller's tensor")
    if kind not in _inplace_warned:
        _inplace_warned.add(kind)
        warnings.warn(f"pyalign.token_logprobs: inplace_backward=True ignored, {reason}; the "
                      f"gradient is computed out of place (warned once per process)",
                      RuntimeWarning, stacklevel=3)
    return False


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V], labels [N] -> (logprobs [N], entropy [N] or [0]); grads for logits only."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, with_entropy, backend, inplace_backward):
        logprobs, entropy, stats = _token_logprobs_fwd(logits, labels, ignore_index, temperature,
                                                     with_entropy, backend)
        ctx.save_for_backward(logits, labels, stats, entropy)
        ctx.config = (ignore_index, temperature, with_entropy, backend, inplace_backward)
        ctx.mark_non_differentiable(stats)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, stats, entropy = ctx.saved_tensors
        ignore_index, temperature, with_entropy, backend, inplace_backward = ctx.config
        if grad_logprobs is None:
            grad_logprobs = stats.new_zeros(stats.shape[0])  # stats: [N, 2] (m, log-sum-exp) per row
        if not with_entropy:
            grad_entropy, entropy = None, None
        args = (grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                logits, labels, stats, entropy, ignore_index, temperature, backend)
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

    ``temperature`` must be finite and at least 1e-4 (``pyalign.ops._checks.MIN_TEMPERATURE``):
    the gradient scales as 1/T, which overflows float16 below it, and fp32 z/T of logits of a few
    tens no longer resolves the log-prob. ``ignore_index`` is an int in the int64 range (not a
    bool, not a float); ``entropy`` and ``inplace_backward`` are bools.

    ``inplace_backward=True`` writes the gradient into the logits buffer during backward (no
    second [N, V] tensor); use it only when nothing else needs the logits afterwards (autograd
    raises if another op saved them for its backward). Where the write cannot be right, the
    out-of-place backward runs instead, with one RuntimeWarning per reason and process: logits
    whose rows share memory (an expanded, stride-0 or overlapping view), and logits that are a
    leaf, or a view of one (the write would replace the caller's tensor with its gradient, and
    ``.grad`` would share its storage). Logits that are copied first (a non-unit last stride, or
    batch dims that do not flatten into a view) are written in the private copy.
    """
    _checks.check_tensor("logits", logits, floating=True)
    _checks.check_tensor("labels", labels, integer=True)
    _checks.check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(logits.shape)}")
    _checks.check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    temperature = _checks.check_temperature(temperature)
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    entropy = _checks.check_bool("entropy", entropy)
    inplace_backward = _checks.check_bool("inplace_backward", inplace_backward)
    vocab = logits.shape[-1]
    backends.check_name(backend)
    logits_2d = logits if logits.stride(-1) == 1 else logits.contiguous()
    logits_2d = logits_2d.reshape(-1, vocab)
    labels_1d = labels.reshape(-1).to(torch.int64)
    if inplace_backward:
        inplace_backward = _inplace_backward_is_safe(logits_2d)
    logprobs, entropy_out = TokenLogprobsFunction.apply(logits_2d, labels_1d, ignore_index,
                                                        temperature, entropy, backend,
                                                        inplace_backward)
    logprobs = logprobs.view(labels.shape)
    if entropy:
        return logprobs, entropy_out.view(labels.shape)
    return logprobs
