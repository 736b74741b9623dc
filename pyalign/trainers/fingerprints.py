"""What a run's input files held, as sha256 digests stored with its settings, so that a resume
on other files (a data file edited in place, another tokenizer or reward saved over the old) is
refused by name rather than continued with numbers that mean something else.

- ``data`` / ``eval_data``: every byte of the file (of every file of a datasets directory);
- ``tokenizer``: the tokenizer files of the ``--model`` directory;
- ``model``: the model directory's other files: small ones (configs) by content, large ones
  (weights) by name and size, so that fingerprinting a checkpoint of many GiB reads nothing of it;
- ``reward``: the ``--reward`` file or module source, or the reward-model directory (as a model).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Optional

SMALL_FILE_BYTES = 1 << 20  # files up to this size are fingerprinted by content
TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens",
                   "chat_template", "spiece")


def _files(path: str) -> list[str]:
    """``path`` itself, or every file under the directory ``path`` (relative, sorted)."""
    if os.path.isfile(path):
        return [""]
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, name), path) for name in names]
    return sorted(found)


def _digest(path: str, names: list[str], *, by_size_above: Optional[int] = None) -> str:
    digest = hashlib.sha256()
    for name in names:
        full = os.path.join(path, name) if name else path
        size = os.path.getsize(full)
        digest.update(f"{name}\0{size}\0".encode())
        if by_size_above is not None and size > by_size_above:
            continue
        with open(full, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, or of every file of a directory (names and bytes)."""
    return _digest(path, _files(path))


def _is_tokenizer_file(name: str) -> bool:
    return os.path.basename(name).startswith(TOKENIZER_FILES) or name.endswith(".model")


def model_digests(model_dir: str) -> dict:
    """``{"model": ..., "tokenizer": ...}`` of a Hugging Face model directory."""
    names = [n for n in _files(model_dir) if not os.path.basename(n).startswith(".")]
    tokenizer = [n for n in names if _is_tokenizer_file(n)]
    model = [n for n in names if n not in tokenizer]
    return {"model": _digest(model_dir, model, by_size_above=SMALL_FILE_BYTES),
            "tokenizer": _digest(model_dir, tokenizer)}


def reward_source(spec: str) -> Optional[str]:
    """The file or directory a ``--reward`` spec names (None where it cannot be found: loading
    the reward says why)."""
    if os.path.isdir(spec):
        return spec
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        return target if os.path.isfile(target) else None
    found = None
    sys.path.insert(0, os.getcwd())  # a module of the working directory, as --reward loads it
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        pass
    finally:
        sys.path.remove(os.getcwd())
    origin = getattr(found, "origin", None)
    return origin if origin and os.path.isfile(origin) else None


def run_digests(run: dict) -> dict:
    """The fingerprints of a run's input files (see the module docstring)."""
    digests = {}
    if run.get("model") and os.path.isdir(run["model"]):
        digests.update(model_digests(run["model"]))
    for key in ("data", "eval_data"):
        if run.get(key) and os.path.exists(run[key]):
            digests[key] = content_digest(run[key])
    source = reward_source(run["reward"]) if run.get("reward") else None
    if source:
        digests["reward"] = (hashlib.sha256(repr(model_digests(source)).encode()).hexdigest()
                             if os.path.isdir(source) else content_digest(source))
    return digests


__all__ = ["content_digest", "model_digests", "reward_source", "run_digests"]
