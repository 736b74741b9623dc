"""Eager fused linear + log-probs: the reference implementation of the ``linear_logprobs`` family.

The family's contract (every backend's primitives):

forward(hidden[N,H], weight[V,H], bias[V] | None, labels, ignore_index, temperature,
        with_entropy, chunk_size, softcap | None, logit_scale, metrics, keep_rows)
    -> (logprobs, entropy, stats[N,2], log_sum_sq_probs, mean_logits, is_top1 (bool), kept)
    hidden, weight and bias share a dtype, or (an fp32 head) weight and bias share one and one
    of hidden and weight is float32, the other bfloat16 / float16: the logits are then fp32
    products of the narrower one upcast (pyalign._utils.head_logits_dtype; the ops check the
    pair). The head z = softcap·tanh(logit_scale·(hidden·Wᵀ + b) / softcap) / T (no tanh
    without a softcap); stats as for logprobs, of the head logits before T; metrics = three
    bools (log_sum_sq_probs, mean_logits, is_top1 wanted: [N] each, else empty[0]); kept = the
    raw logits of the first keep_rows tokens, kept for backward ([keep_rows, V], of the logits'
    dtype; the ops ask only a backend whose implementation
    has ``KEEPS_LOGITS`` true, the others get keep_rows 0). A label outside [0, V) that is not
    ignore_index (a vocab shard's token whose label another rank holds,
    pyalign/ops/_vocab_parallel.py) is no error: that token gets its row's stats, entropy,
    log_sum_sq_probs and mean_logits; its logprobs and is_top1 are unspecified.
backward(grad_logprobs, grad_entropy | None, hidden, weight, bias, labels, stats, entropy | None,
         ignore_index, temperature, chunk_size, softcap | None, logit_scale, kept, *,
         vocab_shard=False)
    -> (grad_hidden, grad_weight, grad_bias | None), each in its input's dtype; may overwrite
    ``kept`` (of the logits' dtype).
    ignored tokens contribute nothing to grad_weight / grad_bias (a NaN/inf hidden row is
    selected away) and get grad_hidden exactly 0. With vocab_shard, weight is a shard of a
    wider vocabulary and stats / entropy are the whole rows' (used as given, never recomputed
    from the shard); a label outside [0, V) adds no label term.

This backend is the chunked head (pyalign/_chunked_head.py) with the eager logprobs as its
epilogue.
"""
from __future__ import annotations

from pyalign._chunked_head import ChunkedHead
from pyalign.eager import logprobs as _eager_logprobs

PRIMITIVES = ("forward", "backward", "KEEPS_LOGITS")  # KEEPS_LOGITS: a flag, see forward

_head = ChunkedHead(_eager_logprobs)
forward = _head.forward
backward = _head.backward
KEEPS_LOGITS = ChunkedHead.KEEPS_LOGITS
