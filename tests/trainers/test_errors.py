"""Bad input gets a clear error and loses nothing: corrupt or partial checkpoints (named in the
message, left as they are), a crash while saving (the last good checkpoint survives), unknown or
missing config keys, unknown algorithms, a fresh run into a directory that holds a run."""
import os

import pytest
import torch
from trainer_helpers import run_cli, write_config

from pyalign._utils import toml_value
from pyalign.trainers import CheckpointError, load_checkpoint, save_checkpoint
from pyalign.trainers.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

SMALL = dict(batch_size=4, micro_batch_size=4, num_examples=8, eval_every=0, final_eval_batch_size=4)


@pytest.fixture
def finished_run(tmp_path, task_cache_dir):
    """A 2-step dpo run: (config path, out dir, checkpoint path)."""
    config = write_config(tmp_path / "dpo.toml", task_cache_dir, algo="dpo", **SMALL)
    out = tmp_path / "run"
    assert run_cli("--config", config, "--steps", 2, "--out", out) == 0
    checkpoint = out / "checkpoints" / "step-000002.pt"
    assert checkpoint.exists()
    return config, out, checkpoint


def _snapshot(out):
    return {p: open(p, "rb").read() for p in sorted(str(q) for q in out.rglob("*") if q.is_file())}


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_checkpoint_is_named_and_kept(finished_run, capsys, damage):
    config, out, checkpoint = finished_run
    raw = checkpoint.read_bytes()
    if damage == "flip":
        position = len(raw) // 2  # inside the tensor data
        damaged = raw[:position] + bytes([raw[position] ^ 0x40]) + raw[position + 1:]
    elif damage == "truncate":
        damaged = raw[: len(raw) // 2]
    else:
        damaged = b"not a checkpoint at all"
    checkpoint.write_bytes(damaged)
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli("--config", config, "--steps", 4, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err
    assert {"flip": "corrupt", "truncate": "partial", "garbage": "not a pyalign"}[damage] in err
    assert _snapshot(out) == before  # nothing rewritten, nothing deleted
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        load_checkpoint(str(checkpoint))


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "step-000001.pt")
    good = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "weights": torch.randn(5)}
    save_checkpoint(path, good)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, dict(good, weights=torch.randn(5)))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], good["weights"])
    assert os.listdir(tmp_path) == ["step-000001.pt"]  # no temporary file left behind


def test_resume_with_changed_settings_is_refused(finished_run, capsys, tmp_path, task_cache_dir):
    _, out, checkpoint = finished_run
    changed = write_config(tmp_path / "changed.toml", task_cache_dir, algo="dpo", **dict(SMALL, beta=0.3))
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli("--config", changed, "--steps", 4, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "beta" in err and str(checkpoint) in err
    assert _snapshot(out) == before


def test_fresh_run_into_a_finished_run_is_refused(finished_run, capsys):
    config, out, checkpoint = finished_run
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli("--config", config, "--steps", 2, "--out", out) == 2
    assert "--resume" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_without_checkpoint(tmp_path, capsys, task_cache_dir):
    config = write_config(tmp_path / "dpo.toml", task_cache_dir, algo="dpo", **SMALL)
    assert run_cli("--config", config, "--steps", 2, "--out", tmp_path / "empty", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ('algo = "dpo"\nbeta_typo = 0.1\n', "unknown config key(s) 'beta_typo'"),
    ('algo = "dpo"\ntr_tau = 4\n', "'tr_tau' does not apply to algo dpo"),
    ('algo = "rloo"\nlabel_smoothing = 0.1\n', "unknown config key(s) 'label_smoothing'"),
    ('algo = "dpo"\nreference = "trust_region"\n',
     "'reference' of --algo dpo must be one of 'frozen', 'bema'"),
    ('algo = "dpo"\nbeta = "big"\n', "'beta' must be float"),
    ('algo = "dpo"\nloss = "kto"\n', "not a pairwise loss"),
    ('algo = "kto"\nloss = "sigmoid"\n', "not an unpaired loss"),
    ('algo = "dpo"\nbeta = -1.0\n', "'beta' must be > 0"),
    ('algo = "mystery"\n', "unknown algo 'mystery'"),
    ('beta = 0.1\n', "no algorithm: pass --algo"),
    ('algo = "dpo"\n[task]\nsft_stepz = 3\n', "unknown [task] key(s) 'sft_stepz'"),
    ('algo = "dpo"\n[trainer]\nbeta = 0.1\n', "the only tables are [task] and [study]"),
    ('algo = "dpo"\nbeta = \n', "invalid TOML"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    config = _write(tmp_path / "bad.toml", text)
    assert run_cli("--config", config, "--out", tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_yaml_key_without_value(tmp_path, capsys):
    pytest.importorskip("yaml", reason="pyyaml is not installed (YAML configs are optional)")
    config = _write(tmp_path / "bad.yaml", "algo: dpo\nbeta:\n")
    assert run_cli("--config", config) == 2
    assert "'beta' has no value" in capsys.readouterr().err


def test_missing_config_file_and_unknown_algo(tmp_path, capsys):
    assert run_cli("--config", tmp_path / "absent.toml") == 2
    assert "absent.toml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--algo", "ppo-magic")
    assert exit_info.value.code == 2
    assert "invalid choice: 'ppo-magic'" in capsys.readouterr().err


def test_model_with_wrong_vocabulary(tmp_path, capsys, task_cache_dir, tiny_task):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_task.vocab_size + 5, hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=32))
    model.save_pretrained(tmp_path / "model")
    config = write_config(tmp_path / "dpo.toml", task_cache_dir, algo="dpo", **SMALL)
    assert run_cli("--config", config, "--model", tmp_path / "model", "--out", tmp_path / "out") == 2
    assert f"the task uses {tiny_task.vocab_size}" in capsys.readouterr().err


# (algo, flat config values, [task] values, command-line flags, the key, the value as printed)
NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("dpo", dict(lr=NAN), {}, (), "lr", "nan"),
    ("dpo", dict(lr=INF), {}, (), "lr", "inf"),
    ("dpo", dict(lr=-0.001), {}, (), "lr", "-0.001"),
    ("dpo", dict(max_grad_norm=NAN), {}, (), "max_grad_norm", "nan"),
    ("dpo", dict(max_grad_norm=INF), {}, (), "max_grad_norm", "inf"),
    ("dpo", dict(max_grad_norm=-1.0), {}, (), "max_grad_norm", "-1.0"),
    ("dpo", dict(weight_decay=NAN), {}, (), "weight_decay", "nan"),
    ("dpo", dict(temperature=INF), {}, (), "temperature", "inf"),
    ("dpo", dict(temperature=0.0), {}, (), "temperature", "0.0"),
    ("dpo", dict(label_smoothing=0.5), {}, (), "label_smoothing", "0.5"),
    ("dpo", dict(label_smoothing=-0.1), {}, (), "label_smoothing", "-0.1"),
    ("dpo", dict(label_smoothing=NAN), {}, (), "label_smoothing", "nan"),
    ("dpo", dict(beta=INF), {}, (), "beta", "inf"),
    ("dpo", dict(beta=NAN), {}, (), "beta", "nan"),
    ("kto", dict(desirable_weight=-1.0), {}, (), "desirable_weight", "-1.0"),
    ("kto", dict(undesirable_weight=NAN), {}, (), "undesirable_weight", "nan"),
    ("dpo", dict(seed=-1), {}, (), "seed", "-1"),
    ("dpo", dict(seed=True), {}, (), "seed", "True"),
    ("dpo", {}, {}, ("--seed", "-1"), "seed", "-1"),
    ("dpo", {}, {}, ("--task-seed", "-3"), "task_seed", "-3"),
    ("dpo", dict(task_seed=-3), {}, (), "task_seed", "-3"),
    ("dpo", {}, {}, ("--steps", "0"), "steps", "0"),
    ("dpo", {}, {}, ("--threads", "0"), "threads", "0"),
    ("dpo", dict(batch_size=True), {}, (), "batch_size", "True"),
    ("dpo", dict(batch_size=6, micro_batch_size=4), {}, (), "micro_batch_size", "4"),
    ("dpo", dict(final_eval_batch_size=-1), {}, (), "final_eval_batch_size", "-1"),
    ("dpo", dict(warmup_steps=-1), {}, (), "warmup_steps", "-1"),
    ("dpo", dict(checkpoint_every=-1), {}, (), "checkpoint_every", "-1"),
    ("dpo", dict(checkpoint_minutes=NAN), {}, (), "checkpoint_minutes", "nan"),
    ("dpo", dict(checkpoint_minutes=-1.0), {}, (), "checkpoint_minutes", "-1.0"),
    ("dpo", dict(keep_checkpoints=0), {}, (), "keep_checkpoints", "0"),
    ("dpo", dict(num_examples=2), {}, (), "num_examples", "2"),
    ("tr-dpo", dict(tr_alpha=0.0), {}, (), "tr_alpha", "0.0"),
    ("tr-dpo", dict(tr_alpha=1.5), {}, (), "tr_alpha", "1.5"),
    ("tr-dpo", dict(tr_alpha=NAN), {}, (), "tr_alpha", "nan"),
    ("tr-dpo", dict(tr_tau=0), {}, (), "tr_tau", "0"),
    ("tr-dpo", dict(tr_tau=2.5), {}, (), "tr_tau", "2.5"),
    ("tr-dpo", dict(tr_tau=True), {}, (), "tr_tau", "True"),
    ("elastic-reset", dict(er_ema_decay=1.0), {}, (), "er_ema_decay", "1.0"),
    ("elastic-reset", dict(er_ema_decay=NAN), {}, (), "er_ema_decay", "nan"),
    ("elastic-reset", dict(er_reset_every=0), {}, (), "er_reset_every", "0"),
    ("elastic-reset", dict(er_ema_every=-2), {}, (), "er_ema_every", "-2"),
    ("rloo", dict(kl_coef=NAN), {}, (), "kl_coef", "nan"),
    ("rloo", dict(kl_target=INF), {}, (), "kl_target", "inf"),
    ("rloo", dict(kl_horizon=0), {}, (), "kl_horizon", "0"),
    ("rloo", dict(samples_per_prompt=1), {}, (), "samples_per_prompt", "1"),
    ("rloo", dict(temperature=NAN), {}, (), "temperature", "nan"),
    ("dpo", {}, dict(hidden_size=0), (), "task.hidden_size", "0"),
    ("dpo", {}, dict(num_layers=-1), (), "task.num_layers", "-1"),
    ("dpo", {}, dict(prompt_len=1), (), "task.prompt_len", "1"),
    ("dpo", {}, dict(sft_steps=True), (), "task.sft_steps", "True"),
    ("dpo", {}, dict(sft_lr=NAN), (), "task.sft_lr", "nan"),
    ("dpo", {}, dict(label_noise=0.0), (), "task.label_noise", "0.0"),
    ("dpo", {}, dict(rm_l2=-1.0), (), "task.rm_l2", "-1.0"),
    ("dpo", {}, dict(hidden_size=30, num_heads=4), (), "task.hidden_size", "30"),
]


@pytest.mark.parametrize("algo, values, task, flags, key, shown", BAD_VALUES,
                         ids=[f"{row[4]}={row[5]}" for row in BAD_VALUES])
def test_bad_values_are_one_line_before_any_work(tmp_path, capsys, algo, values, task, flags, key, shown):
    from trainer_helpers import TINY_TASK
    cache = tmp_path / "cache"
    lines = [f'task_cache_dir = "{cache}"', f'algo = "{algo}"', "batch_size = 4", "micro_batch_size = 4",
             "num_examples = 8"] if algo not in ("rloo", "elastic-reset") else \
        [f'task_cache_dir = "{cache}"', f'algo = "{algo}"']
    lines = [line for line in lines if line.split(" = ")[0] not in values]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    lines += ["[task]"] + [f"{k} = {toml_value(v)}" for k, v in {**TINY_TASK, **task}.items()]
    config = _write(tmp_path / "bad.toml", "\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_cli("--config", config, "--out", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pyalign train: error: ")
    assert f"'{key}'" in err[0] and shown in err[0] and "must be" in err[0], err[0]
    assert not cache.exists() and not (tmp_path / "out").exists()  # no task build, nothing written


def test_batch_not_divisible_by_the_ranks_is_a_config_error(tmp_path, capsys, monkeypatch):
    """Under torchrun (WORLD_SIZE set) a global batch that does not split over the ranks is
    refused in one line before the task is built, not at the first step."""
    cache = tmp_path / "cache"
    config = _write(tmp_path / "c.toml", f'task_cache_dir = "{cache}"\nalgo = "dpo"\n'
                    "batch_size = 5\nmicro_batch_size = 5\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert run_cli("--config", config, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'batch_size'" in err[0] and "(2)" in err[0] and "5" in err[0], err
    assert not cache.exists() and not (tmp_path / "out").exists()
