"""Eager per-token log-probs: the reference implementation of the ``logprobs`` family.

The family's contract (every backend's primitives; tensors validated, 2-D row-major):

forward(logits[N,V], labels[N] int64, ignore_index, temperature, with_entropy)
    -> (logprobs[N] f32, entropy[N] f32 or empty[0], stats[N,2] f32)
    stats[n] = (m, L): m = max_v logits[n, v] (raw, before the temperature), L = log sum_v
    exp((logits[n, v] - m) / T), so logsumexp(logits/T) = m/T + L. Every backend computes from
    the shifted (z - m) / T <= 0: logprobs = min((z_y - m)/T - L, 0) keeps fp32 accuracy at any
    common logit offset and never overflows; entropy >= 0. Ignored rows: logprobs and entropy
    exactly 0 (their logits may hold NaN/inf: selected away, never multiplied by 0), stats
    unspecified.
backward(grad_logprobs[N] f32, grad_entropy[N] f32 | None, logits, labels, stats,
         entropy[N] | None, ignore_index, temperature, inplace) -> grad_logits (logits' dtype;
    when inplace, written into ``logits`` and returned); log p = (z - m)/T - L from stats;
    ignored rows exactly 0 whatever their logits or upstream gradients hold.
backward_columns(..., temperature, column_start)   (optional: the chunked head's epilogue,
    pyalign/_chunked_head.py, needs it) the same gradient, in place, for logits[:, c0:c0+W]
    of a wider vocabulary: stats of whole rows, labels of the whole vocabulary (the label term
    only where it falls in the slice). A vocab shard's 3-matmul loss (pyalign/ops/_fused_head.py)
    calls it at column 0 with labels outside the shard; a backend without it must take such
    labels in ``backward`` (no label term).

Here ``forward`` and ``backward`` run over chunks of rows, each with about two fp32 temporaries
of the chunk alive at once. Everything is computed from the shifted logits s = (z - m) / T
(m = max_v z_v, so s <= 0 with max 0): log p = s - log sum exp(s) keeps fp32 accuracy at any
common offset of the logits and at any temperature, and is <= 0 by construction. Ignored rows are
masked by selection (``torch.where``), never by multiplying by 0, so NaN or inf in them reaches
neither the outputs nor the gradient.
"""
from __future__ import annotations

import torch

from pyalign._utils import accumulation_dtype
from pyalign.eager._rows import row_chunks, shifted_rows

PRIMITIVES = ("forward", "backward")


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row from log-probs; 0·log 0 = 0 for -inf logits, NaN stays NaN; >= 0
    (every term p log p is <= 0; the clamp only guards rounding, and keeps NaN)."""
    probs = log_probs.exp()
    impossible = probs == 0
    probs.mul_(log_probs).masked_fill_(impossible, 0.0)
    return (-probs.sum(-1)).clamp_(min=0.0)


def forward(logits, labels, ignore_index, temperature, with_entropy):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = torch.empty(num_rows, dtype=acc, device=logits.device)
    stats = torch.empty(num_rows, 2, dtype=acc, device=logits.device)
    entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=logits.device)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, end in row_chunks(num_rows, vocab):
        shifted, peak = shifted_rows(logits[start:end], acc, temperature)
        log_sum = torch.logsumexp(shifted, dim=-1)  # log sum exp(s) >= 0: the max term is e^0
        label_shifted = shifted.gather(1, safe_labels[start:end, None]).squeeze(1)
        chunk_valid = valid[start:end]
        stats[start:end, 0] = peak
        stats[start:end, 1] = log_sum
        # s_y <= 0 <= log_sum: the clamp only removes rounding above 0 (NaN passes through)
        logprobs[start:end] = torch.where(chunk_valid, (label_shifted - log_sum).clamp_(max=0.0), 0.0)
        if with_entropy:
            log_probs = shifted.sub_(log_sum[:, None])
            entropy[start:end] = torch.where(chunk_valid, _entropy_from_log_probs(log_probs), 0.0)
        del shifted
    return logprobs, entropy, stats


def backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
             temperature, inplace):
    return _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, logits if inplace else torch.empty_like(logits), 0)


def backward_columns(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, column_start):
    """backward in place on logits[:, c0:c0+W] of a wider vocabulary (c0 = ``column_start``):
    the row stats are those of whole rows, labels index the whole vocabulary and add their term
    only where they fall in the slice. Used by the vocabulary walk of linear_logprobs."""
    return _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, logits, column_start)


def _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
              temperature, grad_logits, column_start):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    valid = labels != ignore_index
    local = labels - column_start
    in_slice = valid & (local >= 0) & (local < vocab)
    safe_labels = torch.where(in_slice, local, torch.zeros_like(local))
    for start, end in row_chunks(num_rows, vocab):
        chunk_valid = valid[start:end]
        log_probs, _ = shifted_rows(logits[start:end], acc, temperature, stats[start:end, 0])
        log_probs.sub_(stats[start:end, 1, None].to(acc))
        grad = log_probs.exp()  # softmax, turned into the gradient in place below
        g_lp = torch.where(chunk_valid, grad_logprobs[start:end].to(acc), 0.0)
        if grad_entropy is not None:
            g_ent = torch.where(chunk_valid, grad_entropy[start:end].to(acc), 0.0)
            # dH/ds_v = -p_v (log p_v + H); zero where p_v == 0 (masked vocabulary), NaN kept
            impossible = grad == 0
            d_entropy = log_probs.add_(entropy[start:end, None]).mul_(grad)
            d_entropy.masked_fill_(impossible, 0.0).mul_(g_ent[:, None])
            grad.mul_(-g_lp[:, None]).sub_(d_entropy)
        else:
            grad.mul_(-g_lp[:, None])
        del log_probs
        label_term = torch.where(in_slice[start:end], g_lp, 0.0)
        grad.scatter_add_(1, safe_labels[start:end, None], label_term[:, None])
        if temperature != 1.0:
            grad.div_(temperature)
        # Selection, not a zero factor: an ignored row's NaN/inf logits give NaN * 0 = NaN above.
        grad_logits[start:end] = torch.where(chunk_valid[:, None], grad, 0.0)
        del grad
    return grad_logits


@torch.no_grad()
def log_sum_sq_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log Σ_v p_v² of softmax(logits / T) over the last dimension, fp32, no gradient:
    logsumexp(2z) − 2·logsumexp(z) with z = logits/T (WPO's per-token input, as TRL's head).
    Not a primitive: the 3-matmul losses and the trainers' scorer call it on a chunk's logits."""
    scaled = logits.float() / temperature
    return torch.logsumexp(2 * scaled, -1) - 2 * torch.logsumexp(scaled, -1)
