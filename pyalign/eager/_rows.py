"""Row chunking and the shifted rows shared by the eager per-token ops: work over chunks of about
``ROW_CHUNK_ELEMENTS`` logits, with two or three fp32 temporaries of a chunk alive at a time."""
from __future__ import annotations

import torch

ROW_CHUNK_ELEMENTS = 1 << 22  # 16 MiB per fp32 temporary of a chunk


def row_chunks(num_rows: int, row_length: int):
    """(start, end) row ranges of about ROW_CHUNK_ELEMENTS elements each."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, row_length))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def row_max(rows: torch.Tensor) -> torch.Tensor:
    """max_v z_v per row (NaN if the row holds one), 0 for a row of -inf only: the shift, so that
    z - shift is -inf there (probability 0), not -inf - (-inf) = NaN."""
    peak = rows.amax(-1)
    return torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)


def shifted_rows(logits: torch.Tensor, acc: torch.dtype, temperature: float,
                 row_peak: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a fresh fp32 (or fp64) ``(z - m) / T`` that the caller may overwrite, m) with m the row
    max of the raw logits (``row_max``, or ``row_peak`` when given). Shifting before scaling
    keeps the digits a large common offset would take (z - m is exact for nearby values) and
    cannot overflow where z / T would: every entry is <= 0, the max exactly 0."""
    shifted = logits.to(acc, copy=True)
    peak = row_max(shifted) if row_peak is None else row_peak.to(acc)
    shifted.sub_(peak[:, None])
    if temperature != 1.0:
        shifted.div_(temperature)
    return shifted, peak
