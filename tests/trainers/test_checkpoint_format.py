"""The checkpoint format (pyalign/trainers/checkpoint.py): a trainer checkpoint is a plain
``torch.save`` file that ``torch.load(path, weights_only=True)`` opens, holding the run's
settings; ``load_checkpoint`` catches any damaged byte or a cut file (the sha256 in the zip's
archive comment), refuses version-1 files and other versions by name, and the RNG states
round-trip through it exactly."""
import hashlib
import io
import random

import numpy as np
import pytest
import torch
from trainer_helpers import TINY_TASK, run_cli, write_config

from pyalign.trainers import CheckpointError, load_checkpoint, save_checkpoint
from pyalign.trainers.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    restore_rng_state,
)

SMALL = dict(batch_size=4, micro_batch_size=4, num_examples=8, eval_every=0, final_eval_batch_size=4)


def _same(a, b) -> bool:
    """Equal nested payloads: tensors by dtype, shape and value; containers by type and items."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.fixture
def saved(tmp_path):
    """A small checkpoint file and the payload written to it."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 3,
               "weights": {"w": torch.randn(7, 5), "b": torch.randn(5).to(torch.bfloat16)},
               "names": ["a", ("b", 2)], "lr": 0.125, "none": None}
    path = str(tmp_path / "step-000003.pt")
    save_checkpoint(path, payload)
    return path, payload


def test_trainer_checkpoint_opens_with_plain_torch_load(tmp_path, task_cache_dir):
    config = write_config(tmp_path / "tr-dpo.toml", task_cache_dir, algo="tr-dpo", tr_tau=1, **SMALL)
    out = tmp_path / "run"
    assert run_cli("--config", config, "--steps", 2, "--out", out) == 0
    path = out / "checkpoints" / "step-000002.pt"
    plain = torch.load(path, weights_only=True)  # nothing from pyalign
    assert plain["format"] == CHECKPOINT_FORMAT and plain["version"] == CHECKPOINT_VERSION == 2
    assert plain["step"] == 2 and plain["algo"] == "tr-dpo"
    assert {"policy", "optimizer", "reference_strategy", "rng", "trainer", "config"} <= set(plain)
    assert plain["policy"]["model.lm_head.weight"].shape[0] == 64  # the task's vocabulary
    # the run settings that made it, plain types: a run directory describes itself
    run = plain["run"]
    assert (run["algo"], run["steps"], run["out"], run["model"], run["lora"]) == \
        ("tr-dpo", 2, str(out), None, None)
    assert run["task"] == TINY_TASK and run["task_cache_dir"] == task_cache_dir
    assert _same(load_checkpoint(str(path)), plain)


def test_round_trip_keeps_every_type(saved):
    path, payload = saved
    assert _same(load_checkpoint(path), payload)
    assert _same(torch.load(path, weights_only=True), payload)


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    state = capture_rng_state()
    expected = (torch.rand(4), [random.random() for _ in range(4)], np.random.rand(4))
    path = str(tmp_path / "rng.pt")
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "rng": state})
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert [random.random() for _ in range(4)] == expected[1]
    assert np.array_equal(np.random.rand(4), expected[2])


@pytest.mark.parametrize("where", ["zip header", "tensor data", "third", "end record", "digest"])
def test_any_flipped_byte_is_corrupt(saved, where):
    path, _ = saved
    raw = open(path, "rb").read()
    position = {"zip header": 10, "tensor data": len(raw) // 2, "third": len(raw) // 3,
                "end record": len(raw) - 79 - 10, "digest": len(raw) - 5}[where]
    with open(path, "wb") as handle:
        handle.write(raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1:])
    with pytest.raises(CheckpointError, match=f"{path} is corrupt: its checksum does not match"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut_at", ["byte 1", "byte 100", "half", "last byte", "digest"])
def test_a_cut_file_is_partial(saved, cut_at):
    path, _ = saved
    raw = open(path, "rb").read()
    keep = {"byte 1": 1, "byte 100": 100, "half": len(raw) // 2, "last byte": len(raw) - 1,
            "digest": len(raw) - 80}[cut_at]
    with open(path, "wb") as handle:
        handle.write(raw[:keep])
    expected = "is not a pyalign trainer checkpoint" if keep < 4 else "is partial"
    with pytest.raises(CheckpointError, match=f"{path} {expected}"):
        load_checkpoint(path)


def test_a_version_1_file_is_refused_by_name(tmp_path):
    """The version-1 layout: magic line, 8-byte length, sha256, then the torch.save bytes."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "step": 1}, buffer)
    data = buffer.getvalue()
    path = tmp_path / "step-000001.pt"
    path.write_bytes(b"PYALIGN-CKPT\x00v1\n" + len(data).to_bytes(8, "little")
                     + hashlib.sha256(data).digest() + data)
    with pytest.raises(CheckpointError, match=f"{path} has version 1 .*reads version 2"):
        load_checkpoint(str(path))


def test_other_versions_and_foreign_files_are_refused(tmp_path):
    path = str(tmp_path / "step-000001.pt")
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": 3})
    with pytest.raises(CheckpointError, match="has version 3, this pyalign reads version 2"):
        load_checkpoint(path)
    save_checkpoint(path, {"format": "something else", "version": CHECKPOINT_VERSION})
    with pytest.raises(CheckpointError, match="is not a pyalign trainer checkpoint"):
        load_checkpoint(path)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, path)  # no digest
    with pytest.raises(CheckpointError, match="has no sha256 record"):
        load_checkpoint(path)


def test_only_plain_values_are_saved(tmp_path):
    path = tmp_path / "step-000001.pt"
    with pytest.raises(TypeError, match=r"payload\['config'\]\['when'\] is a object"):
        save_checkpoint(str(path), {"format": CHECKPOINT_FORMAT, "config": {"when": object()}})
    assert not path.exists()
