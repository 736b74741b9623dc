"""The trainer checkpoint format: one file per saved step (``step-NNNNNN.pt``), a plain
``torch.save`` zip of a dict of tensors and plain containers, so

    torch.load("runs/dpo/checkpoints/step-000100.pt", weights_only=True)

opens it with nothing from pyalign. The dict holds ``format``/``version``, the run's state
(``policy``: the trainer's scorer module, whose ``model.`` entries are the policy;
``optimizer``, ``reference_strategy``, ``rng``, ``trainer``, ``step``, ``config`` as a dict) and
``run``: the settings of the ``pyalign train`` run that wrote it (``pyalign export`` rebuilds
the policy from them). The zip's archive comment (the file's last 79 bytes, which zip readers
and torch.load skip) is ``pyalign-sha256:`` and the sha256 of every byte before it. Files are
written atomically (``pyalign._utils.atomic_write``) and ``load_checkpoint`` checks the digest,
then loads with ``weights_only=True`` and checks the format and version, so a crash or a damaged
file gives a ``CheckpointError`` naming the file, never a silently wrong resume. The global RNG
states (torch, Python, NumPy, CUDA) are captured and restored here too, as tensors, ints,
strings and tuples.

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
_V1_MAGIC = b"PYALIGN-CKPT\x00v1\n"  # how a version-1 file starts
_ZIP_START = b"PK\x03\x04"  # a torch.save zip starts with a local file header
_ZIP_END = b"PK\x05\x06"  # ... and ends with this 22-byte end-of-archive record
_DIGEST_TAG = b"pyalign-sha256:"  # the archive comment: this tag, then 64 hex digits
_COMMENT_LEN = len(_DIGEST_TAG) + 64
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Settings that may change between a run and its resumption: they do not change the numbers
# (checkpointing, progress, threads, tracking, where the run and the task cache live) or extend
# the run (steps, num_epochs).
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "progress",
                               "steps", "num_epochs", "threads", "out", "report_to",
                               "task_cache_dir"})


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


def _check_plain(key: str, value) -> None:
    """Raise TypeError unless ``value`` is what ``torch.load(weights_only=True)`` reads back:
    tensors, dicts, lists, tuples, numbers, strings, bytes, None."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_plain(f"{key}[{name!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(f"{key}[{index}]", item)
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes,
                                                  torch.dtype))):
        raise TypeError(f"checkpoint entry {key} is a {type(value).__name__}; a checkpoint holds "
                        f"only tensors, plain containers, numbers, strings and None")


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` (tensors and plain containers) as a torch.save zip whose archive
    comment is the sha256 of every byte before it, atomically (``atomic_write``): a crash at any
    point leaves either the old file set or the complete new file, never a partial file under a
    checkpoint name."""
    _check_plain("payload", payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = bytearray(buffer.getvalue())
    if data[-22:-18] != _ZIP_END or data[-2:] != b"\x00\x00":
        raise RuntimeError("torch.save did not end its zip with a comment-less end-of-archive record")
    data[-2:] = _COMMENT_LEN.to_bytes(2, "little")  # the record's comment length, then the comment
    atomic_write(path, bytes(data) + _DIGEST_TAG + hashlib.sha256(data).hexdigest().encode())


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint (its sha256, then ``torch.load(..., weights_only=True)``,
    its format and version); any damage raises CheckpointError naming the file."""
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
    body, comment = raw[:-_COMMENT_LEN], raw[-_COMMENT_LEN:]
    if raw[-22:-18] == _ZIP_END and raw[-2:] == b"\x00\x00":
        raise CheckpointError(f"checkpoint {path} has no sha256 record: a torch.save file, but not "
                              f"one pyalign wrote (save_checkpoint)")
    if not comment.startswith(_DIGEST_TAG):
        raise CheckpointError(f"checkpoint {path} is partial: it does not end with its sha256 "
                              f"record ({len(raw)} bytes)")
    if hashlib.sha256(body).hexdigest().encode() != comment[len(_DIGEST_TAG):]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match")
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a valid checksum over bytes torch cannot read
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, "
                              f"this pyalign reads version {CHECKPOINT_VERSION}")
    return payload


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two settings dicts, except RESUMABLE_CHANGES and
    keys only one of them knows (a setting older or newer than the checkpoint)."""
    return sorted(k for k in set(saved) & set(current)
                  if k not in RESUMABLE_CHANGES and saved[k] != current[k])


def check_resumable(path: str, payload: dict, config: dict, run: dict) -> None:
    """CheckpointError unless the checkpoint ``payload`` (read from ``path``) was written with
    this trainer ``config`` and, where both are known, these ``pyalign train`` run settings."""
    for what, saved, current in (("config", payload["config"], config),
                                 ("run settings", payload.get("run") or {}, run)):
        if what == "run settings" and not (saved and current):
            continue  # a trainer built in Python has none
        changed = changed_settings(saved, current)
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise CheckpointError(f"checkpoint {path} was written with different {what} ({diffs}); "
                                  f"resume with the same settings")


def read_settings(path: str) -> dict:
    """The ``algo``, ``step``, ``config`` and ``run`` entries of a checkpoint, read without
    loading its tensors (memory-mapped); any damage raises load_checkpoint's CheckpointError.
    The full check of the file (its sha256) is load_checkpoint's, when the run resumes."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        settings = {key: payload[key] for key in ("algo", "step", "config")}
        settings["run"] = payload.get("run") or {}
        if payload.get("format") == CHECKPOINT_FORMAT and payload.get("version") == CHECKPOINT_VERSION:
            return settings
    except Exception:  # noqa: BLE001 - any damage: the full check says what it is
        pass
    payload = load_checkpoint(path)
    return {"algo": payload["algo"], "step": payload["step"], "config": payload["config"],
            "run": payload.get("run") or {}}


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
           "changed_settings", "check_resumable", "read_settings", "checkpoint_path",
           "list_checkpoints", "save_checkpoint", "load_checkpoint", "resolve_resume_path",
           "capture_rng_state", "restore_rng_state"]
