"""Eager per-token log-probs (family ``logprobs`` of pyalign/backends.py): ``forward`` and
``backward`` over chunks of rows, each with about two fp32 temporaries of the chunk alive at once.
"""
from __future__ import annotations

import torch

from pyalign._utils import accumulation_dtype
from pyalign.eager._rows import row_chunks, scaled_rows


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row from log-probs; 0·log 0 = 0 for -inf logits, NaN stays NaN."""
    probs = log_probs.exp()
    impossible = probs == 0
    probs.mul_(log_probs).masked_fill_(impossible, 0.0)
    return -probs.sum(-1)


def forward(logits, labels, ignore_index, temperature, with_entropy):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = torch.empty(num_rows, dtype=acc, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=logits.device)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, end in row_chunks(num_rows, vocab):
        scaled = scaled_rows(logits[start:end], acc, temperature)
        chunk_lse = torch.logsumexp(scaled, dim=-1)
        label_logit = scaled.gather(1, safe_labels[start:end, None]).squeeze(1)
        chunk_valid = valid[start:end]
        lse[start:end] = chunk_lse
        logprobs[start:end] = torch.where(chunk_valid, label_logit - chunk_lse, 0.0)
        if with_entropy:
            log_probs = scaled.sub_(chunk_lse[:, None])
            entropy[start:end] = torch.where(chunk_valid, _entropy_from_log_probs(log_probs), 0.0)
        del scaled
    return logprobs, entropy, lse


def backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index,
             temperature, inplace):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    grad_logits = logits if inplace else torch.empty_like(logits)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, end in row_chunks(num_rows, vocab):
        chunk_valid = valid[start:end]
        log_probs = scaled_rows(logits[start:end], acc, temperature).sub_(lse[start:end, None])
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
        grad.scatter_add_(1, safe_labels[start:end, None], g_lp[:, None])
        if temperature != 1.0:
            grad.div_(temperature)
        # ignored rows are selected to 0, not left at 0 * softmax: a NaN/inf logit there would
        # make that NaN
        grad.masked_fill_(~chunk_valid[:, None], 0.0)
        grad_logits[start:end] = grad
        del grad
    return grad_logits
