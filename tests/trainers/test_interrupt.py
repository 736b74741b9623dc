"""A clean stop and a one-word resume: SIGINT to a real ``pyalign train`` process finishes the
step, writes a checkpoint, says how to resume and exits 130; ``pyalign train --out DIR --resume``
alone continues with the stored settings to the numbers of an uninterrupted run. SIGTERM exits
143; a second signal stops at once. A resume with a changed setting is refused by its key."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from trainer_helpers import read_records, run_cli, strip_timing, write_config

from pyalign.trainers import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STEPS = 8
# no periodic checkpoint: the one at the stop is the stop's; every step evaluates (slow enough
# for the signal to land mid-run)
RUN = dict(algo="tr-dpo", batch_size=8, micro_batch_size=4, num_examples=24, tr_tau=3, lr=0.01,
           eval_every=1, eval_batch_size=8, final_eval_batch_size=8, checkpoint_every=0,
           checkpoint_minutes=0.0)


def _steps_logged(path):
    try:
        with open(path) as handle:
            return len([line for line in handle if line.endswith("\n")])
    except OSError:
        return 0


@pytest.mark.slow
def test_sigint_stops_cleanly_and_resume_alone_continues_exactly(tmp_path, task_cache_dir, capsys):
    config = write_config(tmp_path / "run.toml", task_cache_dir, **RUN)
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert run_cli("--config", config, "--steps", STEPS, "--out", straight) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", PYALIGN_DEVICE="cpu")
    child = subprocess.Popen([sys.executable, "-m", "pyalign.cli", "train", "--config", config,
                              "--steps", str(STEPS), "--out", str(pieces), "--no-progress"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _steps_logged(pieces / "metrics.jsonl") < 2:
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, "the run never logged two steps"
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    stopped = [int(name[5:11]) for name in os.listdir(pieces / "checkpoints")]
    assert len(stopped) == 1 and 2 <= stopped[0] < STEPS  # the step it was in, finished
    step = stopped[0]
    lines = [line for line in err.splitlines() if "stopped after step" in line]
    assert lines == [f"pyalign train: SIGINT: stopped after step {step} of {STEPS}, checkpoint "
                     f"{pieces / 'checkpoints' / f'step-{step:06d}.pt'}; resume with: pyalign train "
                     f"--out {pieces} --resume"], err
    assert "Traceback" not in err and not (pieces / ".lock").exists()
    assert _steps_logged(pieces / "metrics.jsonl") == step

    capsys.readouterr()
    assert run_cli("--out", pieces, "--resume") == 0  # no --config, no --algo: the stored settings
    assert f"resuming from step {step} of {STEPS}" in capsys.readouterr().err
    assert [strip_timing(r) for r in read_records(pieces)] == \
        [strip_timing(r) for r in read_records(straight)]
    final = f"step-{STEPS:06d}.pt"
    weights = load_checkpoint(str(pieces / "checkpoints" / final))["policy"]
    for key, tensor in load_checkpoint(str(straight / "checkpoints" / final))["policy"].items():
        assert torch.equal(weights[key], tensor), key


def _signal_at(monkeypatch, step: int, signals: list):
    from pyalign.trainers import PreferenceTrainer
    real = PreferenceTrainer.train_step

    def train_step(self, at):
        if at == step:
            for number in signals:
                os.kill(os.getpid(), number)
        return real(self, at)
    monkeypatch.setattr(PreferenceTrainer, "train_step", train_step)


def test_sigterm_exits_143_and_a_second_signal_stops_at_once(tmp_path, task_cache_dir, capsys,
                                                            monkeypatch):
    config = write_config(tmp_path / "run.toml", task_cache_dir, **dict(RUN, eval_every=0))
    _signal_at(monkeypatch, 2, [signal.SIGTERM])
    assert run_cli("--config", config, "--steps", STEPS, "--out", tmp_path / "term") == 143
    assert "SIGTERM: stopped after step 2 of 8" in capsys.readouterr().err
    assert os.listdir(tmp_path / "term" / "checkpoints") == ["step-000002.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    _signal_at(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    assert run_cli("--config", config, "--steps", STEPS, "--out", tmp_path / "twice") == 130
    assert "stopped at once" in capsys.readouterr().err
    assert not (tmp_path / "twice" / "checkpoints").exists()  # nothing written past the stop


def test_resume_refuses_changed_settings_by_key(tmp_path, task_cache_dir, capsys):
    """A resume continues with the stored run settings (model, LoRA, ...): a different one
    given on the command line is refused, naming the key; steps may grow."""
    config = write_config(tmp_path / "run.toml", task_cache_dir, **dict(RUN, eval_every=0))
    out = tmp_path / "run"
    assert run_cli("--config", config, "--steps", 1, "--out", out, "--lora", "r=4,alpha=8") == 0
    checkpoint = out / "checkpoints" / "step-000001.pt"
    for flags, key in ((("--lora", "r=4,alpha=64"), "'lora'"), (("--beta", "0.3"), "'beta'"),
                       (("--task-seed", "1"), "'task_seed'"), (("--algo", "dpo"), "'algo'")):
        capsys.readouterr()
        assert run_cli("--out", out, "--resume", "--steps", 2, *flags) == 2, flags
        err = capsys.readouterr().err
        assert key in err and str(checkpoint) in err, (flags, err)
    assert run_cli("--out", out, "--resume", "--steps", 2, "--lora", "r=4,alpha=8") == 0
    assert load_checkpoint(str(out / "checkpoints" / "step-000002.pt"))["run"]["lora"]["alpha"] == 8.0
