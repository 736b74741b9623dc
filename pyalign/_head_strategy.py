"""The fused head's strategies and modes as implementation objects of the linear_logprobs family
(its contract: pyalign/eager/linear_logprobs.py). pyalign/backends.py decides which one runs
(``head_implementation``); this module builds them. docs/gpu.md says what each costs and why.

* ``chunked_triton()``: strategy "chunked" on CUDA: ``ChunkedHead`` (pyalign/_chunked_head.py)
  with the Triton logprobs kernels (pyalign/kernels/logprobs.py) as its epilogue: cuBLAS matmuls
  over vocabulary slices of every token (``gpu_chunk_tokens`` tokens' worth of logits at a time),
  the epilogue turning each slice into row stats (forward) or its d-logits in place (backward).
  Strategy "fused" is the Triton tile kernels' module itself (pyalign/kernels/linear_logprobs.py).
* ``SplitHead(forward_from, backward_from)``: one implementation's forward, another's backward
  (the fused forward, batch-invariant by construction, with the chunked, deterministic backward).
  Any backward takes any forward's row stats; only the kept logits tie them, and a split head
  keeps none.
* ``BlockwiseHead(inner)``: the batch-invariant forward of a chunked head: the rows in blocks of
  ``BLOCK_ROWS`` (the last one padded with ignored zero rows), each block copied into the same
  buffer, so every matmul and reduction a row goes through has one shape and one alignment
  whatever else is in the batch (a matmul of another row count may take another code path and
  round differently).
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from pyalign._chunked_head import ChunkedHead

STRATEGIES = ("auto", "fused", "chunked")
STRATEGY_ENV = "PYALIGN_HEAD_STRATEGY"

# The chunked strategy's working set on a GPU (docs/gpu.md): GPU_CHUNK_TOKENS tokens' worth of
# logits per vocabulary slice (the matmuls' operand traffic hides under their FLOPs from ~520
# tokens or columns on an H100), at most GPU_CHUNK_BYTES of them in the inputs' dtype.
GPU_CHUNK_TOKENS = 4096
GPU_CHUNK_BYTES = 1 << 30
# Rows per block of the batch-invariant forward of a chunked head (cpu, eager): on CPU (MKL) the
# forward of 1024 tokens (H = 512, V = 32000) took about the default path's time in blocks of 128
# rows and twice it in blocks of 64 (the weight re-packed per block); padding costs at most 127.
BLOCK_ROWS = 128


class HeadMode(NamedTuple):
    """What a linear_token_logprobs call asks of the head's implementation."""
    strategy: str = "auto"
    deterministic: bool = False
    batch_invariant: bool = False


def gpu_chunk_tokens(vocab: int, itemsize: int) -> int:
    """Tokens' worth of logits per slice of a chunked head on a GPU: GPU_CHUNK_TOKENS, fewer where
    their logits would pass GPU_CHUNK_BYTES (at least one)."""
    return max(1, min(GPU_CHUNK_TOKENS, GPU_CHUNK_BYTES // max(1, vocab * itemsize)))


def chunked_triton() -> ChunkedHead:
    """Strategy "chunked": the chunked head with the Triton logprobs epilogue."""
    return ChunkedHead(importlib.import_module("pyalign.kernels.logprobs"))


class SplitHead:
    """``forward_from``'s forward and ``backward_from``'s backward, keeping no logits."""

    KEEPS_LOGITS = False

    def __init__(self, forward_from, backward_from):
        self.forward_from, self.backward_from = forward_from, backward_from

    def forward(self, *args):
        *outputs, kept = self.forward_from.forward(*args[:-1], 0)  # keep_rows: none
        return (*outputs, kept)

    def backward(self, *args, **kwargs):
        return self.backward_from.backward(*args, **kwargs)


class BlockwiseHead:
    """``inner``'s forward in fixed blocks of ``rows`` rows (batch-invariant), its backward as
    is; keeps no logits (a kept row would take another matmul shape than a recomputed one)."""

    KEEPS_LOGITS = False

    def __init__(self, inner, rows: int = BLOCK_ROWS):
        self.inner, self.rows = inner, rows

    def forward(self, hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows):
        num_rows, rows = hidden.shape[0], self.rows
        if num_rows == 0:
            return self.inner.forward(hidden, weight, bias, labels, ignore_index, temperature,
                                      with_entropy, chunk_size, softcap, logit_scale, metrics, 0)
        block_hidden = hidden.new_zeros(rows, hidden.shape[1])
        block_labels = labels.new_full((rows,), ignore_index)
        # the slice width the inner head derives from (rows, V, chunk_size): fixed by the block
        pieces = []
        for lo in range(0, num_rows, rows):
            hi = min(num_rows, lo + rows)
            block_hidden[:hi - lo].copy_(hidden[lo:hi])
            block_labels[:hi - lo].copy_(labels[lo:hi])
            if hi - lo < rows:  # the last block: ignored zero rows after the batch's
                block_hidden[hi - lo:].zero_()
                block_labels[hi - lo:].fill_(ignore_index)
            outputs = self.inner.forward(block_hidden, weight, bias, block_labels, ignore_index,
                                         temperature, with_entropy, chunk_size, softcap,
                                         logit_scale, metrics, 0)
            pieces.append([out[:hi - lo] if out.shape[0] else out for out in outputs[:-1]])
        return (*_joined(pieces), hidden.new_empty(0, weight.shape[0]))

    def backward(self, *args, **kwargs):
        return self.inner.backward(*args, **kwargs)


def _joined(pieces):
    """The blocks' outputs (logprobs, entropy, stats, three metrics), concatenated."""
    return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))
