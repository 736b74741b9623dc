"""Eager fused linear + log-probs (family ``linear_logprobs`` of pyalign/backends.py).

``make_chunked_linear`` builds the chunked path for any backend's logprobs primitives: the cpu
backend (pyalign/_cpp_backend.py) uses it with its C++ logprobs kernels as the chunk epilogue;
this module's own ``forward`` and ``backward`` use the eager logprobs.

The head's logits are z = softcap(logit_scale * (hidden @ W.T + b)) / T (docs/algorithms.md,
"Fused linear log-probs"). Without a softcap the scale folds into the temperature the epilogue
sees (T / logit_scale), so it costs nothing, and the epilogue's gradient is already d/d(raw
logits). With one, the chunk is transformed into an fp32 buffer first and the gradient gets the
factor logit_scale * (1 - tanh^2) after the epilogue.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pyalign._utils import accumulation_dtype
from pyalign.eager import logprobs as _eager_logprobs

# Default chunk: about this many bytes of fp32 logits (16 MiB: 131 rows at V = 32000; in
# backward a vocabulary slice of as many logits: 2048 columns at N = 2048). Large enough for the
# matmuls to run at full speed on CPU, small next to the fp32 weight gradient every path returns.
DEFAULT_CHUNK_BYTES = 1 << 24


def default_chunk_rows(vocab: int, max_rows: int = 1024) -> int:
    return max(1, min(max_rows, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab))))


def _effective_temperature(temperature, softcap, logit_scale):
    return temperature / logit_scale if softcap is None else temperature


def _softcapped(raw, softcap, logit_scale, out):
    """out = softcap * tanh(logit_scale * raw / softcap), in out's dtype (fp32)."""
    out.copy_(raw)
    out.mul_(logit_scale / softcap).tanh_()
    return out


def _metrics(head_logits, labels, valid, stats, temperature, want):
    """(log sum p^2, mean of z, is_top1) of a chunk of head logits (before the temperature),
    each None when not in ``want``; ignored rows 0 / False (selection)."""
    acc = torch.float32 if head_logits.dtype != torch.float64 else torch.float64
    log_sum_sq = mean = top1 = None
    if want[0]:
        # log sum_v p_v^2 = logsumexp(2 s) - 2 L with s = (z - m) / T the epilogue's shift
        doubled = head_logits.to(acc, copy=True).sub_(stats[:, 0, None].to(acc))
        doubled.mul_(2.0 / temperature)
        log_sum_sq = torch.logsumexp(doubled, -1) - 2 * stats[:, 1].to(acc)
        del doubled
        log_sum_sq = torch.where(valid, log_sum_sq, 0.0)
    if want[1]:
        mean = head_logits.sum(-1, dtype=acc) / (head_logits.shape[-1] * temperature)
        mean = torch.where(valid, mean, 0.0)
    if want[2]:
        # the first maximum (as argmax); a NaN anywhere in the row makes it no one's top-1
        has_nan = torch.isnan(head_logits.amax(-1))
        top1 = (head_logits.argmax(-1) == labels) & valid & ~has_nan
    return log_sum_sq, mean, top1


def make_chunked_linear(logprobs_impl):
    """linear_logprobs primitives that hold at most ``chunk_size x V`` logits at a time, plus
    the first ``keep_rows`` rows' logits kept from forward to backward (no recompute there).

    The matmuls run through torch; ``logprobs_impl`` (any backend's logprobs primitives) is the
    per-chunk epilogue: forward reduces a chunk's logits to (logprobs, entropy, row stats),
    backward turns the chunk into its gradient in place. Gradients of hidden, weight and bias
    accumulate in fp32 whatever their dtype.
    """

    def _blocks(num_rows, rows, keep_rows):
        """(start, end, kept) row blocks: the kept rows as one block, then chunks of ``rows``."""
        if keep_rows > 0:
            yield 0, keep_rows, True
        for start in range(keep_rows, num_rows, rows):
            yield start, min(num_rows, start + rows), False

    def _raw_logits(hidden_rows, weight, bias, out):
        torch.mm(hidden_rows, weight.t(), out=out)
        if bias is not None:
            out += bias
        return out

    def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        rows = chunk_size or default_chunk_rows(vocab)
        device = hidden.device
        acc = accumulation_dtype(hidden.dtype)
        epilogue_t = _effective_temperature(temperature, softcap, logit_scale)
        logprobs_out = torch.empty(num_rows, dtype=acc, device=device)
        stats = torch.empty(num_rows, 2, dtype=acc, device=device)  # (m, log sum exp)
        entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=device)
        metric_out = [torch.empty(num_rows if want else 0, dtype=dtype, device=device)
                      for want, dtype in zip(metrics, (acc, acc, torch.bool), strict=True)]
        kept = torch.empty(keep_rows, vocab, dtype=hidden.dtype, device=device)
        chunk = (torch.empty(min(rows, num_rows - keep_rows), vocab, dtype=hidden.dtype,
                             device=device) if keep_rows < num_rows else None)
        capped = (torch.empty(min(rows, num_rows), vocab, dtype=acc, device=device)
                  if softcap is not None else None)
        for start, end, is_kept in _blocks(num_rows, rows, keep_rows):
            raw = kept if is_kept else _raw_logits(hidden[start:end], weight, bias,
                                                   chunk[:end - start])
            if is_kept:
                _raw_logits(hidden[:keep_rows], weight, bias, kept)
            # the epilogue sees the head logits in sub-chunks of `rows` (the softcap's buffer)
            step = rows if (softcap is not None or any(metrics)) else end - start
            for sub in range(0, end - start, step):
                lo, hi = start + sub, min(end, start + sub + step)
                head = raw[sub:sub + hi - lo]
                if softcap is not None:
                    head = _softcapped(head, softcap, logit_scale, capped[:hi - lo]).mul_(softcap)
                lp, ent, chunk_stats = logprobs_impl.forward(head, labels[lo:hi], ignore_index,
                                                             epilogue_t, with_entropy)
                logprobs_out[lo:hi] = lp
                stats[lo:hi] = chunk_stats
                if with_entropy:
                    entropy[lo:hi] = ent
                if any(metrics):
                    valid = labels[lo:hi] != ignore_index
                    for out, value in zip(metric_out, _metrics(head, labels[lo:hi], valid,
                                                               stats[lo:hi], epilogue_t, metrics),
                                          strict=True):
                        if value is not None:
                            out[lo:hi] = value
        return (logprobs_out, entropy, stats, *metric_out, kept)

    def _gradient_in_place(raw, grad_logprobs, grad_entropy, labels, stats, entropy,
                           ignore_index, temperature, softcap, logit_scale, column_start):
        """Turn ``raw`` (raw logits of columns column_start.. of some rows) into d objective /
        d raw, in place."""
        epilogue_t = _effective_temperature(temperature, softcap, logit_scale)
        if softcap is None:
            return logprobs_impl.backward_columns(grad_logprobs, grad_entropy, raw, labels, stats,
                                                  entropy, ignore_index, epilogue_t, column_start)
        acc = accumulation_dtype(raw.dtype)
        # the transformed logits and the tanh, in fp32, row by row blocks of ~DEFAULT_CHUNK_BYTES
        rows = default_chunk_rows(raw.shape[1], raw.shape[0])
        tanh_buf = torch.empty(rows, raw.shape[1], dtype=acc, device=raw.device)
        head_buf = torch.empty_like(tanh_buf)
        for lo in range(0, raw.shape[0], rows):
            hi = min(raw.shape[0], lo + rows)
            tanh = _softcapped(raw[lo:hi], softcap, logit_scale, tanh_buf[:hi - lo])
            head = torch.mul(tanh, softcap, out=head_buf[:hi - lo])
            grad = logprobs_impl.backward_columns(
                grad_logprobs[lo:hi], None if grad_entropy is None else grad_entropy[lo:hi],
                head, labels[lo:hi], stats[lo:hi], None if entropy is None else entropy[lo:hi],
                ignore_index, epilogue_t, column_start)
            # d z / d raw = logit_scale * (1 - tanh^2); an ignored row's factor may be NaN (a
            # padded row's logits): its gradient stays 0 by selection
            grad.mul_(tanh.square_().sub_(1.0).mul_(-logit_scale))
            ignored = labels[lo:hi] == ignore_index
            if bool(ignored.any()):
                grad.masked_fill_(ignored[:, None], 0.0)
            raw[lo:hi] = grad
        return raw

    def _mm_into(out, a, b, accumulate):
        """out (fp32 or the inputs' dtype) = or += a @ b, the product formed in out's dtype."""
        if a.dtype != out.dtype:
            a, b = a.to(out.dtype), b.to(out.dtype)
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)

    def backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                 ignore_index, temperature, chunk_size, softcap, logit_scale, kept):
        """The kept rows from their kept logits (one block); the others by walking the
        vocabulary: for each slice of columns, recompute the logits of all those rows, turn them
        into their gradient, and add slice @ W_slice to d_hidden and write slice^T @ hidden into
        d_weight's rows of the slice (every token in one matmul: no [V, H] read-modify-write per
        token chunk)."""
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        keep_rows = kept.shape[0]
        acc = accumulation_dtype(weight.dtype)
        device = hidden.device
        valid = labels != ignore_index
        all_valid = bool(valid.all())
        # An ignored token's hidden row may hold NaN/inf (padding): its d logits row is 0, but
        # 0 * NaN in d_weight = d_logits^T @ hidden is NaN, so its row is zeroed by selection.
        masked_hidden = hidden if all_valid else torch.where(valid[:, None], hidden, 0.0)
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=device)
        grad_weight = torch.empty(weight.shape, dtype=acc, device=device)
        grad_bias = torch.empty(vocab, dtype=acc, device=device) if bias is not None else None

        def block_gradient(raw, lo, hi, column_start):
            return _gradient_in_place(
                raw, grad_logprobs[lo:hi], None if grad_entropy is None else grad_entropy[lo:hi],
                labels[lo:hi], stats[lo:hi], None if entropy is None else entropy[lo:hi],
                ignore_index, temperature, softcap, logit_scale, column_start)

        if keep_rows > 0:
            grad = block_gradient(kept, 0, keep_rows, 0)
            _mm_into(grad_hidden[:keep_rows], grad, weight, False)
            _mm_into(grad_weight, grad.t(), masked_hidden[:keep_rows], False)
            if grad_bias is not None:
                torch.sum(grad, 0, dtype=acc, out=grad_bias)
            del grad
        rest = num_rows - keep_rows
        if rest > 0:
            # a slice holds as many logits as chunk_size rows would (default ~32 MiB of fp32)
            elements = (chunk_size * vocab if chunk_size else DEFAULT_CHUNK_BYTES // 4)
            width = max(1, min(vocab, elements // rest))
            rest_hidden = masked_hidden[keep_rows:]
            rest_grad_hidden = grad_hidden[keep_rows:]
            buffer = torch.empty(rest * width, dtype=hidden.dtype, device=device)
            for v0 in range(0, vocab, width):
                v1 = min(vocab, v0 + width)
                raw = _raw_logits(rest_hidden, weight[v0:v1], None if bias is None else bias[v0:v1],
                                  buffer[:rest * (v1 - v0)].view(rest, v1 - v0))
                grad = block_gradient(raw, keep_rows, num_rows, v0)
                _mm_into(rest_grad_hidden, grad, weight[v0:v1], v0 > 0)
                _mm_into(grad_weight[v0:v1], grad.t(), rest_hidden, keep_rows > 0)
                if grad_bias is not None:
                    if keep_rows > 0:
                        grad_bias[v0:v1] += grad.sum(0, dtype=acc)
                    else:
                        torch.sum(grad, 0, dtype=acc, out=grad_bias[v0:v1])
                del raw, grad
        if num_rows == 0:  # no token: nothing wrote the weight and bias gradients
            grad_weight.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
        if not all_valid:
            grad_hidden.masked_fill_(~valid[:, None], 0.0)
        grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias

    return SimpleNamespace(forward=forward, backward=backward)


_chunked = make_chunked_linear(_eager_logprobs)
forward = _chunked.forward
backward = _chunked.backward
