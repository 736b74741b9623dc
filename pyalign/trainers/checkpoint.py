"""The trainer checkpoint format: one file per saved step (``step-NNNNNN.pt``), a plain
``torch.save`` zip of a dict of tensors and plain containers, so

    torch.load("runs/dpo/checkpoints/step-000100.pt", weights_only=True)

opens it with nothing from pyalign. The dict holds ``format``/``version``, the run's state
(``policy``, ``optimizer``, ``reference_strategy``, ``rng``, ``trainer``, ``config`` as a dict,
and ``run``: the settings of ``pyalign train`` that made it) and ``sha256``, a digest of
everything else in it (``payload_digest``: each key path, type and value, tensor bytes
included). Files are written atomically (``pyalign._utils.atomic_write``); ``load_checkpoint``
loads with ``weights_only=True`` and checks the zip's end record, the digest, the format and
the version, so a crash or a damaged file gives a ``CheckpointError`` naming the file, never a
silently wrong resume. The global RNG states (torch, Python, NumPy, CUDA) are captured and
restored here too, as tensors, ints, strings and lists.

Version 1 (pyalign before checkpoint version 2) wrapped the torch.save bytes in a magic line,
a length and a checksum; such files are refused with a message saying so.
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
CHECKPOINT_VERSION = 2
DIGEST_KEY = "sha256"  # the payload key holding payload_digest of the rest
_V1_MAGIC = b"PYALIGN-CKPT\x00v1\n"  # how a version-1 file starts
_ZIP_START = b"PK\x03\x04"  # every torch.save zip starts with a local file header ...
_ZIP_END = b"PK\x05\x06"  # ... and ends with this end-of-archive record (22 bytes, no comment)
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


def _digest_update(digest, key: str, value) -> None:
    """Feed one payload entry (its key path, type and value, recursively) to ``digest``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:tensor:{value.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"{key}:dict:{len(value)}\n".encode())
        for name, item in value.items():
            _digest_update(digest, f"{key}/{name!r}", item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{key}:{type(value).__name__}:{len(value)}\n".encode())
        for index, item in enumerate(value):
            _digest_update(digest, f"{key}/{index}", item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype)):
        digest.update(f"{key}:{type(value).__name__}:{value!r}\n".encode())
    else:  # torch.load(weights_only=True) could not read it back either
        raise TypeError(f"checkpoint entry {key} is a {type(value).__name__}; a checkpoint holds "
                        f"only tensors, plain containers, numbers, strings and None")


def payload_digest(payload: dict) -> str:
    """The hex sha256 of every entry of ``payload`` but ``DIGEST_KEY``: key paths, types and
    values (tensors by dtype, shape and bytes), in the payload's order, which torch.save keeps."""
    digest = hashlib.sha256()
    for name, value in payload.items():
        if name != DIGEST_KEY:
            _digest_update(digest, repr(name), value)
    return digest.hexdigest()


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` (tensors and plain containers) with its digest under ``DIGEST_KEY``,
    atomically (``atomic_write``): a crash at any point leaves either the old file set or the
    complete new file, never a partial file under a checkpoint name."""
    framed = {name: value for name, value in payload.items() if name != DIGEST_KEY}
    framed[DIGEST_KEY] = payload_digest(framed)
    buffer = io.BytesIO()
    torch.save(framed, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint (``torch.load(..., weights_only=True)``, then its digest,
    format and version); any damage raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if raw.startswith(_V1_MAGIC):
        raise CheckpointError(f"checkpoint {path} has version 1 (written by an older pyalign), "
                              f"this pyalign reads version {CHECKPOINT_VERSION}: resume it with the "
                              f"pyalign that wrote it, or start the run again")
    if not raw.startswith(_ZIP_START):
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint "
                              f"({len(raw)} bytes, not a torch.save file)")
    if len(raw) < 22 or raw[-22:-18] != _ZIP_END:
        raise CheckpointError(f"checkpoint {path} is partial: it ends before its end-of-archive "
                              f"record ({len(raw)} bytes)")
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a complete file whose zip records or pickle are damaged
        raise CheckpointError(f"checkpoint {path} is corrupt: torch.load cannot read it: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, "
                              f"this pyalign reads version {CHECKPOINT_VERSION}")
    try:
        intact = payload.get(DIGEST_KEY) == payload_digest(payload)
    except TypeError:
        intact = False
    if not intact:
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match its content")
    del payload[DIGEST_KEY]
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
           "DIGEST_KEY", "payload_digest", "checkpoint_path", "list_checkpoints", "save_checkpoint",
           "load_checkpoint", "resolve_resume_path", "capture_rng_state", "restore_rng_state"]
