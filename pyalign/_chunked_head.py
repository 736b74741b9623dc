"""The chunked head: the linear_logprobs family's primitives (pyalign/eager/linear_logprobs.py)
holding about ``chunk_size x V`` logits at a time, plus the first ``keep_rows`` tokens' logits
kept from forward to backward (no recompute there). The eager and cpu backends run it with their
own logprobs kernels as the epilogue.

    head = ChunkedHead(epilogue)
    head.forward(...), head.backward(...)    # the family's contract; head.KEEPS_LOGITS is True

``ChunkedHead`` does the matmuls (torch: MKL on CPU, cuBLAS on a GPU), the vocabulary walk, the
softcap transform, the exact combination of the slices' row stats, the per-token metrics and the
gradient matmuls. The per-slice work is the **epilogue**, any object with two functions of the
logprobs family's contract (pyalign/eager/logprobs.py), called on one vocabulary slice of some
rows' head logits (after the softcap, before the temperature; fp32 or the inputs' dtype):

    forward(head_logits[R, W], labels, ignore_index, temperature, with_entropy)
        -> (_, entropy[R] | empty, stats[R, 2]): the slice's own row stats (m_s, L_s) and
        entropy H_s; called with a dummy label (column 0) and ignore_index -1, the label's logit
        being read from its slice here
    backward_columns(grad_logprobs, grad_entropy, head_logits, labels, stats, entropy,
                     ignore_index, temperature, column_start) -> head_logits, turned in place
        into d objective / d head logits with the whole rows' stats (the label term only for
        labels in columns column_start.. of the slice)

so a GPU strategy runs the same class with a Triton epilogue (cuBLAS matmuls per slice, the
epilogue kernels between them).

Both directions walk the vocabulary in slices of every token's logits (about
DEFAULT_CHUNK_BYTES of fp32 of them): on CPU a matmul over all tokens and a slice of W runs at
the speed of the whole product, while row chunks re-pack all of W for every chunk. Forward
combines the slices' row stats exactly (docs/algorithms.md, "The fused linear path"); backward
writes each slice's weight gradient with one matmul. Without a softcap the logit scale folds into
the temperature the epilogue sees (T / logit_scale), so it costs nothing and the epilogue's
gradient is already d/d(raw logits); with one, each slice is transformed into an fp32 buffer
first and the gradient gets the factor logit_scale * (1 - tanh^2) after the epilogue.

An fp32 head (hidden and weight of different dtypes, one of them float32:
pyalign._utils.head_logits_dtype) forms every logit as an fp32 product: a bf16 / fp16 hidden
state is upcast once per direction (an N x H fp32 temporary), a bf16 / fp16 weight a block of
DEFAULT_CHUNK_BYTES of its rows at a time; the gradients come back in each input's own dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from pyalign import _workspace
from pyalign._utils import accumulation_dtype, head_logits_dtype

# The default working set: bytes of fp32 logits (16 MiB: a vocabulary slice of 2048 columns at
# N = 2048 tokens), large enough for the matmuls to run at full speed on CPU, small next to the
# fp32 weight gradient every path returns.
DEFAULT_CHUNK_BYTES = 1 << 24
_FP32_BYTES = 4


def default_chunk_rows(vocab: int, max_rows: int = 1024) -> int:
    """Rows of ``vocab`` fp32 logits that fit in DEFAULT_CHUNK_BYTES (at most ``max_rows``)."""
    return max(1, min(max_rows, DEFAULT_CHUNK_BYTES // (_FP32_BYTES * max(1, vocab))))


def slice_width(rows: int, vocab: int, chunk_size=None) -> int:
    """Columns per vocabulary slice of ``rows`` tokens: as many logits as ``chunk_size`` rows of
    the whole vocabulary would hold (default DEFAULT_CHUNK_BYTES of fp32)."""
    elements = chunk_size * vocab if chunk_size else DEFAULT_CHUNK_BYTES // _FP32_BYTES
    return max(1, min(vocab, elements // max(1, rows)))


def upcast_blocks(matrix, dtype):
    """(r0, r1, matrix[r0:r1] in ``dtype``): the whole matrix when it has the dtype, else blocks
    of rows whose upcast copy holds DEFAULT_CHUNK_BYTES (an fp32 head's bf16 / fp16 weight: never
    a whole fp32 copy of it)."""
    if matrix.dtype == dtype:
        yield 0, matrix.shape[0], matrix
        return
    rows = max(1, DEFAULT_CHUNK_BYTES // (_FP32_BYTES * max(1, matrix.shape[1])))
    for r0 in range(0, matrix.shape[0], rows):
        r1 = min(matrix.shape[0], r0 + rows)
        yield r0, r1, matrix[r0:r1].to(dtype)


def _raw_logits(hidden_rows, weight, bias, out):
    """out = hidden_rows @ weight.T (+ bias), formed in out's dtype (hidden_rows's)."""
    for v0, v1, block in upcast_blocks(weight, out.dtype):
        torch.mm(hidden_rows, block.t(), out=out if v1 - v0 == out.shape[1] else out[:, v0:v1])
    if bias is not None:
        out += bias
    return out


def _mm_into(out, a, b, accumulate):
    """out (fp32 or the inputs' dtype) = or += a @ b, the product formed in out's dtype; ``b`` of
    another dtype than ``a`` (an fp32 head's weight) is upcast a block of its rows at a time."""
    if a.dtype == b.dtype:
        if a.dtype != out.dtype:
            a, b = a.to(out.dtype), b.to(out.dtype)
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    a = a.to(out.dtype)
    for k0, k1, block in upcast_blocks(b, out.dtype):
        if accumulate or k0 > 0:
            out.addmm_(a[:, k0:k1], block)
        else:
            torch.mm(a[:, k0:k1], block, out=out)


class HeadOptions(NamedTuple):
    """The head's transform: z = softcap·tanh(logit_scale·raw / softcap) / T (no tanh without a
    softcap)."""
    temperature: float
    softcap: Optional[float]
    logit_scale: float

    @property
    def epilogue_temperature(self) -> float:
        """The temperature the epilogue sees: without a softcap the scale folds into it."""
        return self.temperature / self.logit_scale if self.softcap is None else self.temperature

    def tanh(self, raw, out):
        """out = tanh(logit_scale * raw / softcap), in out's dtype (fp32): the softcapped head
        logits are softcap times it, their derivative logit_scale * (1 - tanh^2)."""
        out.copy_(raw)
        return out.mul_(self.logit_scale / self.softcap).tanh_()


class _SliceStats:
    """The per-slice results of one group of rows, gathered while walking the vocabulary, then
    combined exactly in float64: L = logsumexp_s(L_s + (m_s - m) / T), H = sum_s pi_s (H_s -
    log pi_s) with pi_s the slice's share of the probability."""

    def __init__(self, labels, valid, vocab, temperature, metrics, acc):
        rows, device = labels.shape[0], labels.device
        self.labels, self.valid, self.vocab = labels, valid, vocab
        self.temperature, self.metrics, self.acc = temperature, metrics, acc
        self.label_logit = torch.zeros(rows, dtype=torch.float64, device=device)
        self.logit_sum = torch.zeros(rows, dtype=torch.float64, device=device)
        self.peaks, self.log_sums, self.entropies = [], [], []
        self.log_sq, self.tops, self.top_columns = [], [], []

    def add(self, head, v0, stats, entropy):
        """One slice: its head logits (columns v0..), the epilogue's stats and entropy."""
        width = head.shape[1]
        self.peaks.append(stats[:, 0])
        self.log_sums.append(stats[:, 1])
        if entropy is not None:
            self.entropies.append(entropy)
        local = self.labels - v0
        in_slice = self.valid & (local >= 0) & (local < width)
        picked = head.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1)
        self.label_logit = torch.where(in_slice, picked.to(torch.float64), self.label_logit)
        if self.metrics[0]:  # log sum_v exp(2 (z_v - m_s) / T) over the slice
            doubled = head.to(self.acc, copy=True).sub_(stats[:, 0, None])
            self.log_sq.append(torch.logsumexp(doubled.mul_(2.0 / self.temperature), -1))
            del doubled
        if self.metrics[1]:
            self.logit_sum += head.sum(-1, dtype=torch.float64)
        if self.metrics[2]:
            top, column = head.max(-1)  # the first maximum of the slice
            self.tops.append(top.to(torch.float64))
            self.top_columns.append(column + v0)

    def combine(self):
        """(logprobs, entropy or None, stats [R, 2], [log_sum_sq, mean, is_top1] or None each)."""
        f64, valid, temperature = torch.float64, self.valid, self.temperature
        log_sum = torch.stack(self.log_sums).to(f64)
        no_mass = torch.isneginf(log_sum)  # a slice of -inf logits only: probability 0
        peak = torch.where(no_mass, -math.inf, torch.stack(self.peaks).to(f64))
        row_peak = peak.amax(0)
        shift = torch.where(torch.isneginf(row_peak), 0.0, row_peak)
        log_share = log_sum + (peak - shift) / temperature  # log of each slice's sum exp(s)
        total = torch.logsumexp(log_share, 0)
        log_pi = log_share - total  # log of each slice's share of the probability
        zero = torch.zeros((), dtype=f64, device=valid.device)
        logprobs = ((self.label_logit - shift) / temperature - total).clamp(max=0.0)
        entropy = None
        if self.entropies:
            terms = torch.where(no_mass, zero, log_pi.exp() * (torch.stack(self.entropies) - log_pi))
            entropy = torch.where(valid, terms.sum(0).clamp(min=0.0), zero)
        values = [None, None, None]
        if self.metrics[0]:
            per_slice = torch.where(no_mass, -math.inf,
                                    2 * log_pi + torch.stack(self.log_sq).to(f64) - 2 * log_sum)
            values[0] = torch.where(valid, torch.logsumexp(per_slice, 0), zero)
        if self.metrics[1]:
            values[1] = torch.where(valid, self.logit_sum / (self.vocab * temperature), zero)
        if self.metrics[2]:
            best_slice = torch.stack(self.tops).max(0).indices[None, :]  # the first slice of the max
            argmax = torch.stack(self.top_columns).gather(0, best_slice).squeeze(0)
            values[2] = (argmax == self.labels) & valid & ~torch.isnan(row_peak)
        return (torch.where(valid, logprobs, zero), entropy, torch.stack([shift, total], 1),
                values)


class ChunkedHead:
    """The linear_logprobs primitives over vocabulary slices, with ``epilogue`` (see the module
    docstring) for the per-slice row stats and gradients."""

    KEEPS_LOGITS = True

    def __init__(self, epilogue):
        self.epilogue = epilogue

    # ------------------------------------------------------------------------------ forward

    def forward(self, hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows):
        """The kept rows (their whole logits in one matmul, kept for backward) and the others
        (recomputed slice by slice), each group walking the vocabulary (``_walk_forward``)."""
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        hidden = hidden.to(head_logits_dtype(hidden.dtype, weight.dtype))  # the logits' dtype
        device, acc = hidden.device, accumulation_dtype(hidden.dtype)
        options = HeadOptions(temperature, softcap, logit_scale)
        logprobs = torch.empty(num_rows, dtype=acc, device=device)
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
            raw_slice, width = self._slicer(hidden, weight, bias, kept, lo, hi, chunk_size,
                                            whole=softcap is None and not any(metrics))
            lp, ent, group_stats, values = self._walk_forward(
                raw_slice, labels[lo:hi], valid[lo:hi], vocab, width, options, with_entropy,
                metrics, hidden.dtype)
            logprobs[lo:hi], stats[lo:hi] = lp, group_stats
            if with_entropy:
                entropy[lo:hi] = ent
            for out, value in zip(metric_out, values, strict=True):
                if value is not None:
                    out[lo:hi] = value
        return (logprobs, entropy, stats, *metric_out, kept)

    @staticmethod
    def _slicer(hidden, weight, bias, kept, lo, hi, chunk_size, whole):
        """(raw_slice(v0, v1) -> rows lo:hi's raw logits of columns v0:v1, the slice width). The
        kept rows are whole in memory already: one slice of the whole vocabulary, read once,
        unless (not ``whole``) a softcap or a metric needs an fp32 temporary of the slice."""
        vocab = weight.shape[0]
        width = slice_width(hi - lo, vocab, chunk_size)
        if lo < kept.shape[0]:
            return (lambda v0, v1: kept[:, v0:v1]), vocab if whole else width
        buffer = torch.empty((hi - lo) * width, dtype=hidden.dtype, device=hidden.device)

        def raw_slice(v0, v1):
            out = buffer[:(hi - lo) * (v1 - v0)].view(hi - lo, v1 - v0)
            return _raw_logits(hidden[lo:hi], weight[v0:v1], None if bias is None else bias[v0:v1],
                               out)
        return raw_slice, width

    def _walk_forward(self, raw_slice, labels, valid, vocab, width, options, with_entropy,
                      metrics, dtype):
        """Per-row results of one group of rows, slice by slice of the vocabulary: the epilogue
        reduces each slice to its own row stats, which ``_SliceStats`` combines."""
        rows, device = labels.shape[0], labels.device
        acc = accumulation_dtype(dtype)
        temperature = options.epilogue_temperature
        # the slices' own row stats come from the epilogue with a dummy label (column 0) and no
        # ignored row; the label's logit is read from its slice
        dummy = torch.zeros(rows, dtype=torch.int64, device=device)
        walk = _SliceStats(labels, valid, vocab, temperature, metrics, acc)
        capped = (torch.empty(rows * width, dtype=acc, device=device)
                  if options.softcap is not None else None)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            head = raw_slice(v0, v1)
            if options.softcap is not None:
                head = options.tanh(head, capped[:rows * (v1 - v0)].view(rows, v1 - v0))
                head = head.mul_(options.softcap)
            _, slice_entropy, slice_stats = self.epilogue.forward(head, dummy, -1, temperature,
                                                                  with_entropy)
            walk.add(head, v0, slice_stats, slice_entropy if with_entropy else None)
        return walk.combine()

    # ----------------------------------------------------------------------------- backward

    def backward(self, grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                 ignore_index, temperature, chunk_size, softcap, logit_scale, kept, *,
                 vocab_shard=False):
        """The kept rows from their kept logits (one block); the others by walking the
        vocabulary (``_backward_walk``). Every slice takes the whole rows' ``stats`` as given,
        so a shard of a wider vocabulary (``vocab_shard``) needs nothing else."""
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        keep_rows = kept.shape[0]
        acc = accumulation_dtype(weight.dtype)
        valid = labels != ignore_index
        all_valid = bool(valid.all())
        # An ignored token's hidden row may hold NaN/inf (padding): its d logits row is 0, but
        # 0 * NaN in d_weight = d_logits^T @ hidden is NaN, so its row is zeroed by selection.
        masked_hidden = hidden if all_valid else torch.where(valid[:, None], hidden, 0.0)
        masked_hidden = masked_hidden.to(head_logits_dtype(hidden.dtype, weight.dtype))
        grads = (torch.empty(hidden.shape, dtype=acc, device=hidden.device),
                 torch.empty(weight.shape, dtype=acc, device=hidden.device),
                 torch.empty(vocab, dtype=acc, device=hidden.device) if bias is not None else None)
        upstream = _Upstream(grad_logprobs, grad_entropy, labels, stats, entropy, ignore_index,
                             HeadOptions(temperature, softcap, logit_scale))
        if keep_rows > 0:
            grad = self._gradient_in_place(kept, upstream.rows(0, keep_rows), 0)
            _mm_into(grads[0][:keep_rows], grad, weight, False)
            _mm_into(grads[1], grad.t(), masked_hidden[:keep_rows], False)
            if grads[2] is not None:
                torch.sum(grad, 0, dtype=acc, out=grads[2])
            del grad
            _workspace.give_back(kept)  # used up: the next call's kept logits reuse its pages
        if num_rows > keep_rows:
            self._backward_walk(masked_hidden, weight, bias, grads, upstream, keep_rows,
                                chunk_size)
        grad_hidden, grad_weight, grad_bias = grads
        if num_rows == 0:  # no token: nothing wrote the weight and bias gradients
            grad_weight.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
        if not all_valid:
            grad_hidden.masked_fill_(~valid[:, None], 0.0)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype))

    def _backward_walk(self, masked_hidden, weight, bias, grads, upstream, keep_rows, chunk_size):
        """Rows keep_rows.. by walking the vocabulary: for each slice of columns, recompute the
        logits of all those rows, turn them into their gradient, add slice @ W_slice to d_hidden
        and write slice^T @ hidden into d_weight's rows of the slice (every token in one matmul:
        no [V, H] read-modify-write per token chunk)."""
        grad_hidden, grad_weight, grad_bias = grads
        rest_hidden = masked_hidden[keep_rows:]
        rest, vocab = rest_hidden.shape[0], weight.shape[0]
        width = slice_width(rest, vocab, chunk_size)
        buffer = torch.empty(rest * width, dtype=masked_hidden.dtype, device=masked_hidden.device)
        block = upstream.rows(keep_rows, keep_rows + rest)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            raw = _raw_logits(rest_hidden, weight[v0:v1], None if bias is None else bias[v0:v1],
                              buffer[:rest * (v1 - v0)].view(rest, v1 - v0))
            grad = self._gradient_in_place(raw, block, v0)
            _mm_into(grad_hidden[keep_rows:], grad, weight[v0:v1], v0 > 0)
            _mm_into(grad_weight[v0:v1], grad.t(), rest_hidden, keep_rows > 0)
            if grad_bias is not None:
                if keep_rows > 0:
                    grad_bias[v0:v1] += grad.sum(0, dtype=grad_bias.dtype)
                else:
                    torch.sum(grad, 0, dtype=grad_bias.dtype, out=grad_bias[v0:v1])
            del raw, grad

    def _gradient_in_place(self, raw, upstream, column_start):
        """Turn ``raw`` (raw logits of columns column_start.. of ``upstream``'s rows) into
        d objective / d raw, in place."""
        options = upstream.options
        temperature = options.epilogue_temperature
        if options.softcap is None:
            return self.epilogue.backward_columns(*upstream.epilogue_args(0, raw.shape[0], raw),
                                                  temperature, column_start)
        acc = accumulation_dtype(raw.dtype)
        # the transformed logits and the tanh, in fp32, row by row blocks of ~DEFAULT_CHUNK_BYTES
        rows = default_chunk_rows(raw.shape[1], raw.shape[0])
        tanh_buf = torch.empty(rows, raw.shape[1], dtype=acc, device=raw.device)
        head_buf = torch.empty_like(tanh_buf)
        for lo in range(0, raw.shape[0], rows):
            hi = min(raw.shape[0], lo + rows)
            tanh = options.tanh(raw[lo:hi], tanh_buf[:hi - lo])
            head = torch.mul(tanh, options.softcap, out=head_buf[:hi - lo])
            grad = self.epilogue.backward_columns(*upstream.epilogue_args(lo, hi, head),
                                                  temperature, column_start)
            # d z / d raw = logit_scale * (1 - tanh^2); an ignored row's factor may be NaN (a
            # padded row's logits): its gradient stays 0 by selection
            grad.mul_(tanh.square_().sub_(1.0).mul_(-options.logit_scale))
            ignored = upstream.labels[lo:hi] == upstream.ignore_index
            if bool(ignored.any()):
                grad.masked_fill_(ignored[:, None], 0.0)
            raw[lo:hi] = grad
        return raw


class _Upstream(NamedTuple):
    """What backward gets per row (upstream gradients, labels, the forward's stats and entropy)
    and the head's options; ``rows`` selects a block of rows."""
    grad_logprobs: torch.Tensor
    grad_entropy: Optional[torch.Tensor]
    labels: torch.Tensor
    stats: torch.Tensor
    entropy: Optional[torch.Tensor]
    ignore_index: int
    options: HeadOptions

    def rows(self, lo, hi) -> "_Upstream":
        def part(tensor):
            return None if tensor is None else tensor[lo:hi]
        return self._replace(grad_logprobs=self.grad_logprobs[lo:hi],
                             grad_entropy=part(self.grad_entropy), labels=self.labels[lo:hi],
                             stats=self.stats[lo:hi], entropy=part(self.entropy))

    def epilogue_args(self, lo, hi, logits):
        """backward_columns' arguments up to the temperature, for rows lo:hi of this block."""
        block = self.rows(lo, hi)
        return (block.grad_logprobs, block.grad_entropy, logits, block.labels, block.stats,
                block.entropy, self.ignore_index)
