"""The trainer checkpoint format: one file per saved step (``step-NNNNNN.pt``) holding a magic
line, the 8-byte little-endian payload length, the payload's sha256 and the payload
(``torch.save`` of a dict with ``format``/``version``). Files are written atomically
(``pyalign._utils.atomic_write``) and verified on reading, so a crash or a damaged file gives a
``CheckpointError`` naming the file, never a silently wrong resume. The global RNG states
(torch, Python, NumPy, CUDA) are captured and restored here too.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re

import numpy as np
import torch

from pyalign._utils import atomic_write

CHECKPOINT_FORMAT = "pyalign-trainer-checkpoint"
CHECKPOINT_VERSION = 1
_MAGIC = b"PYALIGN-CKPT\x00v1\n"  # then 8-byte payload length, 32-byte sha256, payload (torch.save)
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Config fields that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "progress"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or from an incompatible run."""


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:06d}.pt")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` atomically (``atomic_write``): a crash at any point leaves either the
    old file set or the complete new file, never a partial file under a checkpoint name."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    atomic_write(path, b"".join([_MAGIC, len(data).to_bytes(8, "little"), hashlib.sha256(data).digest(),
                                 data]))


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint; any damage raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    header = len(_MAGIC) + 8 + 32
    if len(raw) < header or not raw.startswith(_MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint or is "
                              f"truncated ({len(raw)} bytes)")
    length = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 8], "little")
    digest = raw[len(_MAGIC) + 8:header]
    data = raw[header:]
    if len(data) != length:
        raise CheckpointError(f"checkpoint {path} is partial: {len(data)} of {length} payload bytes")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a valid checksum over bytes torch cannot read
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, "
                              f"this pyalign reads version {CHECKPOINT_VERSION}")
    return payload


def resolve_resume_path(resume: str | bool, checkpoint_dir: str) -> str:
    """The file to resume from: an explicit path, or the newest checkpoint in checkpoint_dir."""
    if isinstance(resume, str) and resume not in ("", "latest"):
        if not os.path.isfile(resume):
            raise CheckpointError(f"checkpoint {resume} does not exist")
        return resume
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint (step-NNNNNN.pt) in {checkpoint_dir}")
    return found[-1][1]


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RESUMABLE_CHANGES",
           "checkpoint_path", "list_checkpoints", "save_checkpoint", "load_checkpoint",
           "resolve_resume_path", "capture_rng_state", "restore_rng_state"]
