"""A killed run loses at most a few minutes: checkpoints are written periodically by default,
``kill -9`` at any moment followed by ``--resume`` reaches the numbers of an uninterrupted run
(metrics.jsonl without duplicates, the same final weights), leftover temporary files are removed,
and a run killed before its first checkpoint restarts from scratch under ``--resume``."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from trainer_helpers import read_records, run_cli, strip_timing, write_config

from pyalign.trainers import PreferenceConfig, RLConfig, load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# 4 checkpoints in 16 steps; each step is slow enough (2 micro-batches + an evaluation) that the
# kill lands between two checkpoints, with metrics lines logged past the newest one.
KILLED = dict(algo="tr-dpo", batch_size=8, micro_batch_size=4, num_examples=24, tr_tau=3, lr=0.01,
              eval_every=1, eval_batch_size=8, final_eval_batch_size=8, checkpoint_every=4,
              keep_checkpoints=2)
STEPS = 16


def _steps_logged(path):
    try:
        with open(path) as handle:
            return [json.loads(line)["step"] for line in handle if line.endswith("\n")]
    except (OSError, ValueError):
        return []


def _final_weights(out):
    return load_checkpoint(str(out / "checkpoints" / f"step-{STEPS:06d}.pt"))["policy"]


def test_periodic_checkpoints_by_default():
    for config in (PreferenceConfig(), RLConfig()):
        assert config.checkpoint_every == 50 and config.checkpoint_minutes == 10.0


def test_time_based_checkpoint(tmp_path, task_cache_dir):
    # checkpoint_every = 0 and a tiny checkpoint_minutes: every step is past the deadline
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="dpo", batch_size=4,
                          micro_batch_size=4, num_examples=8, eval_every=0, final_eval_batch_size=4,
                          checkpoint_every=0, checkpoint_minutes=1e-9, keep_checkpoints=10)
    assert run_cli("--config", config, "--steps", 3, "--out", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == \
        ["step-000001.pt", "step-000002.pt", "step-000003.pt"]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, task_cache_dir, capsys):
    config = write_config(tmp_path / "run.toml", task_cache_dir, **KILLED)
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert run_cli("--config", config, "--steps", STEPS, "--out", straight) == 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", PYALIGN_DEVICE="cpu")
    child = subprocess.Popen([sys.executable, "-m", "pyalign.cli", "train", "--config", config,
                              "--steps", str(STEPS), "--out", str(pieces), "--no-progress"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = pieces / "checkpoints" / "step-000004.pt"
    deadline = time.monotonic() + 120
    try:  # kill once the first periodic checkpoint exists and a step past it is logged
        while not (first.exists() and max(_steps_logged(pieces / "metrics.jsonl"), default=0) > 4):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.002)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    newest = max(int(name[5:11]) for name in os.listdir(pieces / "checkpoints")
                 if name.startswith("step-") and name.endswith(".pt"))
    logged = _steps_logged(pieces / "metrics.jsonl")
    assert newest < STEPS and max(logged) > newest  # lines past the checkpoint, to be dropped
    assert (pieces / ".lock").exists()  # left by the killed run
    # what a kill inside atomic_write leaves behind
    (pieces / "checkpoints" / f".step-{newest + 1:06d}.pt.k1ll3d.tmp").write_bytes(b"partial")
    (pieces / ".metrics.jsonl.k1ll3d.tmp").write_text('{"step": 1')

    capsys.readouterr()
    assert run_cli("--config", config, "--steps", STEPS, "--out", pieces, "--resume") == 0
    err = capsys.readouterr().err
    assert "stale" in err  # the dead run's lock was taken over, with a notice
    expected = [strip_timing(r) for r in read_records(straight)]
    resumed = [strip_timing(r) for r in read_records(pieces)]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)) + [STEPS]
    assert resumed == expected
    weights, reference = _final_weights(pieces), _final_weights(straight)
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key
    leftovers = [name for _, _, names in os.walk(pieces) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    assert not (pieces / ".lock").exists()  # released at exit


def test_resume_before_first_checkpoint_restarts(tmp_path, task_cache_dir, capsys):
    """A run killed before its first checkpoint (its stale lock and some metrics lines left):
    --resume starts from scratch, says so in one line, and logs an uninterrupted run."""
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo="dpo", batch_size=4,
                          micro_batch_size=4, num_examples=8, eval_every=0, final_eval_batch_size=4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("--config", config, "--steps", 2, "--out", straight) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed.mkdir()
    (killed / ".lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n{"step": 2, "lo')
    capsys.readouterr()
    assert run_cli("--config", config, "--steps", 2, "--out", killed, "--resume") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "no complete checkpoint" in line]
    assert len(err) == 1 and "from scratch" in err[0]
    assert [strip_timing(r) for r in read_records(killed)] == \
        [strip_timing(r) for r in read_records(straight)]


def test_metrics_log_resume_drops_records_past_the_step(tmp_path):
    from pyalign.trainers.metrics import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n3\n[1]\n{"step": 4, "lo')
    log = MetricsLog(str(path), resume_step=2)
    log.write({"step": 3, "new": True})
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [{"step": 1}, {"step": 2}, {"step": 3, "new": True}]
