"""Row chunking shared by the eager per-token ops: work over chunks of about
``ROW_CHUNK_ELEMENTS`` logits, with two or three fp32 temporaries of a chunk alive at a time."""
from __future__ import annotations

import torch

ROW_CHUNK_ELEMENTS = 1 << 22  # 16 MiB per fp32 temporary of a chunk


def row_chunks(num_rows: int, row_length: int):
    """(start, end) row ranges of about ROW_CHUNK_ELEMENTS elements each."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, row_length))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def scaled_rows(logits: torch.Tensor, acc: torch.dtype, temperature: float) -> torch.Tensor:
    """A fresh fp32 (or fp64) copy of logits / temperature that the caller may overwrite."""
    scaled = logits.to(acc, copy=True)
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled
