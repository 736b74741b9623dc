"""``--report-to tensorboard wandb``: the TensorBoard event files and the W&B run (offline) hold
the same scalars as metrics.jsonl, read back with TensorBoard's own EventAccumulator and by
parsing the .wandb file; a tracker whose package is missing is refused before any work."""
import glob
import json
import struct

import pytest
from trainer_helpers import read_records, run_cli, write_config

from pyalign.trainers.tracking import scalars

RUN = dict(algo="tr-dpo", batch_size=4, micro_batch_size=4, num_examples=8, tr_tau=2, lr=0.01,
           eval_every=1, eval_batch_size=4, final_eval_batch_size=4)


def _wandb_records(path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: a 7-byte file header,
    32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2
    raw, position, chunks = open(path, "rb").read(), 7, []
    while position + 7 <= len(raw):
        room = 32768 - position % 32768
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(raw[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_the_jsonl_scalars(tmp_path, task_cache_dir, monkeypatch):
    EventAccumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed ([test] extra)").EventAccumulator
    pytest.importorskip("wandb", reason="wandb is not installed ([test] extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    config = write_config(tmp_path / "run.toml", task_cache_dir, **RUN)
    out = tmp_path / "run"
    assert run_cli("--config", config, "--steps", 3, "--out", out, "--report-to", "tensorboard",
                   "wandb") == 0
    records = read_records(out)
    expected = {}  # tag -> {step: value}
    for record in records:
        step, values = scalars(record)
        for name, value in values.items():
            expected.setdefault(name, {})[step] = value
    assert {"loss", "gold_reward", "kl_to_init", "reference_updated", "final/gold_reward"} <= set(expected)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        logged = {event.step: event.value for event in events.Scalars(tag)}
        assert logged == pytest.approx(by_step, rel=1e-6, abs=1e-7), tag  # TensorBoard's float32

    (run_file,) = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, summary = {}, {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    for step in (1, 2, 3):
        assert history[step] == {tag: by_step[step] for tag, by_step in expected.items()
                                 if not tag.startswith("final/")}
    assert all(summary[tag] == by_step[3] for tag, by_step in expected.items() if tag.startswith("final/"))
    assert (out / "wandb-run-id").read_text().strip() in run_file


def test_a_missing_tracker_package_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    config = write_config(tmp_path / "run.toml", str(tmp_path / "cache"), **RUN)
    assert run_cli("--config", config, "--out", tmp_path / "out", "--report-to", "wandb") == 2
    assert "pip install 'pyalign-lm[wandb]'" in capsys.readouterr().err
    assert run_cli("--config", config, "--out", tmp_path / "out", "--report-to", "none", "wandb") == 2
    assert "'none' cannot go with" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
