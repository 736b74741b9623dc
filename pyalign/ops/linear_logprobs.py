"""linear_token_logprobs: log-probs of the labels straight from the last hidden state.

logits = hidden @ weight.T (+ bias) are never materialised whole: the eager and C++ backends
hold at most ``chunk_size x V`` of them at a time (forward and backward, which recomputes them),
the Triton backend keeps tiles on chip. Family "linear_logprobs" of pyalign/backends.py.
"""
from __future__ import annotations

from typing import Literal, Optional, Union, overload

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks


# The third output is the [N, 2] row stats (m, log-sum-exp); the op name says so, which also keeps
# compiled graphs cached for the former [N] lse output from being reused.
@torch.library.custom_op("pyalign::linear_logprobs_stats_fwd", mutates_args=())
def _linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, ignore_index: int, temperature: float,
                         with_entropy: bool, chunk_size: int, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.check_labels_in_range(labels, weight.shape[0], ignore_index)
    implementation = backends.implementation("linear_logprobs", backend, hidden)
    return implementation.forward(hidden, weight, bias, labels, ignore_index, temperature,
                                  with_entropy, chunk_size or None)


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size, backend):
    acc = accumulation_dtype(hidden.dtype)
    rows = hidden.shape[0]
    return (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows if with_entropy else 0, dtype=acc),
            hidden.new_empty((rows, 2), dtype=acc))  # row stats (m, log sum exp)


@torch.library.custom_op("pyalign::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                         hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, stats: torch.Tensor, entropy: Optional[torch.Tensor],
                         ignore_index: int, temperature: float, chunk_size: int, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = backends.implementation("linear_logprobs", backend, hidden)
    grad_hidden, grad_weight, grad_bias = implementation.backward(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, ignore_index,
        temperature, chunk_size or None)
    if grad_bias is None:  # custom ops return tensors; an empty one stands for "no bias"
        grad_bias = weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@_linear_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, ignore_index,
      temperature, chunk_size, backend):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0))


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, backend):
        logprobs, entropy, stats = _linear_logprobs_fwd(hidden, weight, bias, labels, ignore_index,
                                                      temperature, with_entropy, chunk_size, backend)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.config = (ignore_index, temperature, with_entropy, chunk_size, backend)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
        ignore_index, temperature, with_entropy, chunk_size, backend = ctx.config
        if grad_logprobs is None:
            grad_logprobs = stats.new_zeros(stats.shape[0])  # stats: [N, 2] (m, log-sum-exp) per row
        if not with_entropy:
            grad_entropy, entropy = None, None
        grad_hidden, grad_weight, grad_bias = _linear_logprobs_bwd(
            grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            hidden, weight, bias, labels, stats, entropy, ignore_index, temperature, chunk_size,
            backend)
        return (grad_hidden, grad_weight, grad_bias if bias is not None else None,
                None, None, None, None, None, None)


@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: Literal[False] = ...,
                          chunk_size: Optional[int] = ..., backend: str = ...) -> torch.Tensor: ...
@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: Literal[True],
                          chunk_size: Optional[int] = ..., backend: str = ...
                          ) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: bool,
                          chunk_size: Optional[int] = ..., backend: str = ...
                          ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                          temperature: float = 1.0, entropy: bool = False,
                          chunk_size: Optional[int] = None, backend: str = "auto"
                          ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token log-probs of ``labels`` under softmax((hidden @ weight.T + bias) / temperature).

    hidden: [..., H]; weight: [V, H] (an lm_head); bias: [V] or None; labels: hidden.shape[:-1].
    Returns fp32 logprobs shaped like labels (and entropy with ``entropy=True``). Gradients flow to
    hidden, weight and bias, accumulated in fp32. ``chunk_size`` bounds the tokens whose logits
    exist at once on the chunked backends (default: about 64 MiB of fp32 logits): an int >= 1 or
    None. ``temperature``, ``ignore_index`` and ``entropy`` are checked as in token_logprobs
    (temperature finite and >= 1e-4); H must be > 0.
    """
    _checks.check_tensor("hidden", hidden, floating=True)
    _checks.check_tensor("weight", weight, floating=True)
    _checks.check_tensor("labels", labels, integer=True)
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True)
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a non-empty last (hidden size) dimension, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        _checks.check_shape("bias", bias, (weight.shape[0],), "[V]")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    _checks.check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    chunk_size = _checks.check_optional_positive_int("chunk_size", chunk_size)
    temperature = _checks.check_temperature(temperature)
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    entropy = _checks.check_bool("entropy", entropy)
    backends.check_name(backend)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1).to(torch.int64)
    logprobs, entropy_out = LinearTokenLogprobsFunction.apply(
        hidden_2d, weight, bias, labels_1d, ignore_index, temperature, entropy, chunk_size or 0,
        backend)
    logprobs = logprobs.view(labels.shape)
    if entropy:
        return logprobs, entropy_out.view(labels.shape)
    return logprobs
