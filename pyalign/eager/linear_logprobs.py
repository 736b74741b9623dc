"""Eager fused linear + log-probs (family ``linear_logprobs`` of pyalign/backends.py).

``make_chunked_linear`` builds the chunked path for any backend's logprobs primitives: the cpu
backend (pyalign/_cpp_backend.py) uses it with its C++ logprobs kernels as the epilogue; this
module's own ``forward`` and ``backward`` use the eager logprobs.

Both directions walk the vocabulary in slices of every token's logits (about
DEFAULT_CHUNK_BYTES of them): on CPU a matmul over all tokens and a slice of W runs at the speed
of the whole product, while row chunks re-pack all of W for every chunk (~1.8x slower measured
at N = 2048, H = 512, V = 32000). Forward combines the slices' row stats exactly; backward
writes each slice's weight gradient with one matmul. Tokens whose logits a memory budget keeps
(the first ``keep_rows``) get their logits from one matmul in forward and need none in backward.

The head's logits are z = softcap(logit_scale * (hidden @ W.T + b)) / T (docs/algorithms.md,
"The fused linear path"). Without a softcap the scale folds into the temperature the epilogue
sees (T / logit_scale), so it costs nothing, and the epilogue's gradient is already d/d(raw
logits). With one, each slice is transformed into an fp32 buffer first and the gradient gets the
factor logit_scale * (1 - tanh^2) after the epilogue.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from pyalign import _workspace
from pyalign._utils import accumulation_dtype
from pyalign.eager import logprobs as _eager_logprobs

# Default working set: about this many bytes of fp32 logits (16 MiB: a vocabulary slice of 2048
# columns at N = 2048 tokens). Large enough for the matmuls to run at full speed on CPU, small
# next to the fp32 weight gradient every path returns.
DEFAULT_CHUNK_BYTES = 1 << 24


def default_chunk_rows(vocab: int, max_rows: int = 1024) -> int:
    return max(1, min(max_rows, DEFAULT_CHUNK_BYTES // (4 * max(1, vocab))))


def slice_width(rows: int, vocab: int, chunk_size=None) -> int:
    """Columns per vocabulary slice of ``rows`` tokens: as many logits as ``chunk_size`` rows of
    the whole vocabulary would hold (default DEFAULT_CHUNK_BYTES of fp32)."""
    elements = chunk_size * vocab if chunk_size else DEFAULT_CHUNK_BYTES // 4
    return max(1, min(vocab, elements // max(1, rows)))


def _effective_temperature(temperature, softcap, logit_scale):
    return temperature / logit_scale if softcap is None else temperature


def _softcapped(raw, softcap, logit_scale, out):
    """out = tanh(logit_scale * raw / softcap), in out's dtype (fp32): the softcapped head
    logits are softcap times it, their derivative logit_scale * (1 - tanh^2)."""
    out.copy_(raw)
    out.mul_(logit_scale / softcap).tanh_()
    return out


def make_chunked_linear(logprobs_impl):
    """linear_logprobs primitives that hold about ``chunk_size x V`` logits at a time (a
    vocabulary slice of every token), plus the first ``keep_rows`` tokens' logits kept from
    forward to backward (no recompute there).

    The matmuls run through torch; ``logprobs_impl`` (a backend's logprobs primitives, with the
    optional ``backward_columns``) is the epilogue: forward reduces a slice's logits to its row
    stats, backward turns a slice into its gradient in place. Gradients of hidden, weight and bias
    accumulate in fp32 whatever their dtype.
    """

    def _raw_logits(hidden_rows, weight, bias, out):
        torch.mm(hidden_rows, weight.t(), out=out)
        if bias is not None:
            out += bias
        return out

    def _walk_forward(raw_slice, labels, valid, vocab, width, temperature, with_entropy,
                      softcap, logit_scale, metrics, dtype, device):
        """Per-row results of one group of rows whose raw logits ``raw_slice(v0, v1)`` gives,
        slice by slice of the vocabulary: the epilogue reduces each slice to its own row stats
        (m_s, L_s, H_s), which combine exactly (float64, docs/algorithms.md):
        L = logsumexp_s(L_s + (m_s - m) / T), H = sum_s pi_s (H_s - log pi_s) with pi_s the
        slice's share of the probability. Returns (logprobs, entropy, stats, metrics...)."""
        rows = labels.shape[0]
        f64 = torch.float64
        # the slices' own row stats come from the epilogue with a dummy label (column 0) and no
        # ignored row; the label's logit is read from its slice
        dummy = torch.zeros(rows, dtype=torch.int64, device=device)
        label_logit = torch.zeros(rows, dtype=f64, device=device)
        peaks, log_sums, entropies, log_sq, tops, top_columns = [], [], [], [], [], []
        logit_sum = torch.zeros(rows, dtype=f64, device=device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        capped = torch.empty(rows * width, dtype=acc, device=device) if softcap is not None else None
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            head = raw_slice(v0, v1)
            if softcap is not None:
                tanh = _softcapped(head, softcap, logit_scale,
                                   capped[:rows * (v1 - v0)].view(rows, v1 - v0))
                head = tanh.mul_(softcap)
            _, slice_entropy, slice_stats = logprobs_impl.forward(head, dummy, -1, temperature,
                                                                  with_entropy)
            peaks.append(slice_stats[:, 0])
            log_sums.append(slice_stats[:, 1])
            if with_entropy:
                entropies.append(slice_entropy)
            local = labels - v0
            in_slice = valid & (local >= 0) & (local < v1 - v0)
            picked = head.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            label_logit = torch.where(in_slice, picked.to(f64), label_logit)
            if metrics[0]:  # log sum_v exp(2 (z_v - m_s) / T) over the slice
                doubled = head.to(acc, copy=True).sub_(slice_stats[:, 0, None])
                log_sq.append(torch.logsumexp(doubled.mul_(2.0 / temperature), -1))
                del doubled
            if metrics[1]:
                logit_sum += head.sum(-1, dtype=f64)
            if metrics[2]:
                top, column = head.max(-1)  # the first maximum of the slice
                tops.append(top.to(f64))
                top_columns.append(column + v0)
        log_sum = torch.stack(log_sums).to(f64)
        no_mass = torch.isneginf(log_sum)  # a slice of -inf logits only: probability 0
        peak = torch.where(no_mass, -math.inf, torch.stack(peaks).to(f64))
        row_peak = peak.amax(0)
        shift = torch.where(torch.isneginf(row_peak), 0.0, row_peak)
        log_share = log_sum + (peak - shift) / temperature  # log of each slice's sum exp(s)
        total = torch.logsumexp(log_share, 0)
        log_pi = log_share - total  # log of each slice's share of the probability
        logprobs = ((label_logit - shift) / temperature - total).clamp(max=0.0)
        zero = torch.zeros((), dtype=f64, device=device)
        outputs = [torch.where(valid, logprobs, zero)]
        if with_entropy:
            terms = torch.where(no_mass, zero, log_pi.exp() * (torch.stack(entropies) - log_pi))
            outputs.append(torch.where(valid, terms.sum(0).clamp(min=0.0), zero))
        else:
            outputs.append(None)
        stats = torch.stack([shift, total], 1)
        metric_values = [None, None, None]
        if metrics[0]:
            per_slice = torch.where(no_mass, -math.inf,
                                    2 * log_pi + torch.stack(log_sq).to(f64) - 2 * log_sum)
            metric_values[0] = torch.where(valid, torch.logsumexp(per_slice, 0), zero)
        if metrics[1]:
            metric_values[1] = torch.where(valid, logit_sum / (vocab * temperature), zero)
        if metrics[2]:
            best_slice = torch.stack(tops).max(0).indices[None, :]  # the first slice of the max
            argmax = torch.stack(top_columns).gather(0, best_slice).squeeze(0)
            metric_values[2] = (argmax == labels) & valid & ~torch.isnan(row_peak)
        return outputs, stats, metric_values

    def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows):
        """The kept rows (their whole logits in one matmul, kept for backward) and the others
        (recomputed slice by slice), each group walking the vocabulary (``_walk_forward``)."""
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        acc = accumulation_dtype(hidden.dtype)
        epilogue_t = _effective_temperature(temperature, softcap, logit_scale)
        logprobs_out = torch.empty(num_rows, dtype=acc, device=device)
        stats = torch.empty(num_rows, 2, dtype=acc, device=device)  # (m, log sum exp)
        entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=device)
        metric_out = [torch.empty(num_rows if want else 0, dtype=dtype, device=device)
                      for want, dtype in zip(metrics, (acc, acc, torch.bool), strict=True)]
        # from the workspace cache: on CPU a fresh [keep_rows, V] buffer would fault in every page
        kept = _workspace.take(keep_rows, vocab, hidden.dtype, device)
        if keep_rows > 0:
            _raw_logits(hidden[:keep_rows], weight, bias, kept)
        valid = labels != ignore_index
        for lo, hi in ((0, keep_rows), (keep_rows, num_rows)):
            if hi == lo:
                continue
            # The kept rows are whole in memory already: one slice of the whole vocabulary, read
            # once, unless a softcap or a metric needs an fp32 temporary of the slice's size.
            whole = lo < keep_rows and softcap is None and not any(metrics)
            width = vocab if whole else slice_width(hi - lo, vocab, chunk_size)
            if lo < keep_rows:
                def raw_slice(v0, v1):
                    return kept[:, v0:v1]
            else:
                buffer = torch.empty((hi - lo) * width, dtype=hidden.dtype, device=device)

                def raw_slice(v0, v1, lo=lo, hi=hi, buffer=buffer):
                    out = buffer[:(hi - lo) * (v1 - v0)].view(hi - lo, v1 - v0)
                    return _raw_logits(hidden[lo:hi], weight[v0:v1],
                                       None if bias is None else bias[v0:v1], out)
            (lp, ent), group_stats, values = _walk_forward(
                raw_slice, labels[lo:hi], valid[lo:hi], vocab, width, epilogue_t, with_entropy,
                softcap, logit_scale, metrics, hidden.dtype, device)
            logprobs_out[lo:hi] = lp
            stats[lo:hi] = group_stats
            if with_entropy:
                entropy[lo:hi] = ent
            for out, value in zip(metric_out, values, strict=True):
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
                 ignore_index, temperature, chunk_size, softcap, logit_scale, kept, *,
                 vocab_shard=False):
        """The kept rows from their kept logits (one block); the others by walking the
        vocabulary: for each slice of columns, recompute the logits of all those rows, turn them
        into their gradient, and add slice @ W_slice to d_hidden and write slice^T @ hidden into
        d_weight's rows of the slice (every token in one matmul: no [V, H] read-modify-write per
        token chunk). Every slice already takes the whole rows' ``stats`` as given, so a shard
        of a wider vocabulary (``vocab_shard``) needs nothing else."""
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
            _workspace.give_back(kept)  # used up: the next call's kept logits reuse its pages
        rest = num_rows - keep_rows
        if rest > 0:
            width = slice_width(rest, vocab, chunk_size)
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
