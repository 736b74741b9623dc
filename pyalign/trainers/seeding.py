"""The seeding of every random draw of a training run: a ``torch.Generator`` seeded by
``(seed, purpose, step, chunk)``, never a stateful stream, so that a resumed or re-split run
draws exactly what an uninterrupted single-process run draws.
"""
from __future__ import annotations

import hashlib

import torch


def stable_seed(*keys) -> int:
    """A 63-bit seed from any printable keys, the same in every process and Python version."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*keys))


__all__ = ["stable_seed", "make_generator"]
