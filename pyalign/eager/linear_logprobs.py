"""Eager fused linear + log-probs (family ``linear_logprobs`` of pyalign/backends.py).

``make_chunked_linear`` builds the chunked path for any backend's logprobs primitives: the cpu
backend (pyalign/_cpp_backend.py) uses it with its C++ logprobs kernels as the chunk epilogue;
this module's own ``forward`` and ``backward`` use the eager logprobs.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pyalign._utils import accumulation_dtype
from pyalign.eager import logprobs as _eager_logprobs


def make_chunked_linear(logprobs_impl, default_chunk_size: int = 1024):
    """linear_logprobs primitives that hold at most ``chunk_size x V`` logits at a time.

    The matmuls run through torch; ``logprobs_impl`` (any backend's logprobs primitives) is the
    per-chunk epilogue: forward reduces a chunk's logits to (logprobs, entropy, lse), backward
    turns the recomputed chunk into its gradient in place. Gradients of hidden, weight and bias
    accumulate in fp32 whatever their dtype.
    """

    def _chunk_size(chunk_size, num_rows, vocab):
        if chunk_size is not None and chunk_size > 0:
            return int(chunk_size)
        # Aim for ~64 MiB of fp32 logits per chunk, at most default_chunk_size rows.
        return max(1, min(default_chunk_size, (1 << 24) // max(1, vocab)))

    def _chunk_logits(hidden_chunk, weight, bias):
        logits = hidden_chunk @ weight.t()
        if bias is not None:
            logits += bias
        return logits

    def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size):
        num_rows = hidden.shape[0]
        vocab = weight.shape[0]
        rows = _chunk_size(chunk_size, num_rows, vocab)
        acc = accumulation_dtype(hidden.dtype)
        logprobs_out = torch.empty(num_rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logprobs_out)
        entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=hidden.device)
        for start in range(0, num_rows, rows):
            end = min(num_rows, start + rows)
            chunk = _chunk_logits(hidden[start:end], weight, bias)
            lp, ent, chunk_lse = logprobs_impl.forward(chunk, labels[start:end], ignore_index,
                                                       temperature, with_entropy)
            logprobs_out[start:end] = lp
            lse[start:end] = chunk_lse
            if with_entropy:
                entropy[start:end] = ent
            del chunk
        return logprobs_out, entropy, lse

    def backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                 ignore_index, temperature, chunk_size):
        num_rows = hidden.shape[0]
        vocab = weight.shape[0]
        rows = _chunk_size(chunk_size, num_rows, vocab)
        acc = accumulation_dtype(weight.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = (torch.zeros(vocab, dtype=acc, device=weight.device)
                     if bias is not None else None)
        for start in range(0, num_rows, rows):
            end = min(num_rows, start + rows)
            chunk = _chunk_logits(hidden[start:end], weight, bias)
            # The epilogue writes d logits into the chunk buffer itself: one chunk alive.
            grad_chunk = logprobs_impl.backward(
                grad_logprobs[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                chunk, labels[start:end], lse[start:end],
                None if entropy is None else entropy[start:end],
                ignore_index, temperature, True)
            grad_hidden[start:end] = grad_chunk @ weight
            hidden_chunk = hidden[start:end]
            ignored = labels[start:end] == ignore_index
            if bool(ignored.any()):
                # d_weight sums grad^T @ hidden over rows: an ignored row's grad is 0, but 0 * a
                # NaN/inf hidden state there is NaN, so the row is selected out
                hidden_chunk = torch.where(ignored[:, None], 0.0, hidden_chunk)
            if grad_chunk.dtype == acc:
                grad_weight.addmm_(grad_chunk.t(), hidden_chunk)
            else:
                grad_weight.addmm_(grad_chunk.t().to(acc), hidden_chunk.to(acc))
            if grad_bias is not None:
                grad_bias += grad_chunk.sum(0, dtype=acc)
            del chunk, grad_chunk
        grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias

    return SimpleNamespace(forward=forward, backward=backward)


_chunked = make_chunked_linear(_eager_logprobs)
forward = _chunked.forward
backward = _chunked.backward
