"""Every --algo runs a few steps on the embedded task and logs gold reward, KL and the rest;
every preference loss trains; the first DPO-family step sees policy == reference; gradient
accumulation does not change the numbers; bf16 autocast and --model run."""
import math
import os

import pytest
from trainer_helpers import read_records, run_cli, write_config

from pyalign import losses
from pyalign.losses import LABEL_SMOOTHING_NAMES
from pyalign.losses import UNPAIRED_NAMES as UNPAIRED_LOSSES
from pyalign.trainers.presets import ALGOS

PREFERENCE = dict(batch_size=4, micro_batch_size=2, num_examples=8, eval_batch_size=4,
                  final_eval_batch_size=4, lr=0.01)
RL = dict(batch_size=2, micro_batch_size=2, samples_per_prompt=2, eval_batch_size=2,
          final_eval_batch_size=4, lr=0.01)
PER_STEP = {"preference": ("loss", "chosen_reward", "rejected_reward", "margin", "entropy",
                           "gold_reward", "proxy_reward", "kl_to_init", "tokens_per_s"),
            "rl": ("loss", "reward", "gold_reward", "proxy_reward", "kl_to_init", "kl_penalty",
                   "entropy", "tokens_per_s")}


def _extra(algo):
    if algo.startswith("tr-"):
        return {"tr_tau": 1}
    if algo == "elastic-reset":
        return {"er_reset_every": 2}
    return {}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_algo_runs_and_logs_gold_reward(tmp_path, task_cache_dir, algo, capsys):
    family = ALGOS[algo].family
    values = dict(PREFERENCE if family == "preference" else RL, **_extra(algo))
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo=algo, **values)
    out = tmp_path / "out"
    assert run_cli("--config", config, "--steps", 2, "--out", out) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"pyalign train: algo={algo} steps=2 gold_reward=")
    assert "proxy_reward=" in summary and "kl_to_init=" in summary
    records = read_records(out)
    steps = [r for r in records if not r.get("final")]
    assert [r["step"] for r in steps] == [1, 2]
    keys = PER_STEP[family] if algo not in ("kto", "tr-kto") else \
        ("loss", "kto_kl", "entropy", "gold_reward", "proxy_reward", "kl_to_init", "tokens_per_s")
    for record in steps:
        for key in keys:
            assert key in record and math.isfinite(record[key]), (algo, key)
        assert -1.0 <= record["gold_reward"] <= 1.0
        assert record["kl_to_init"] >= 0
    assert records[-1]["final"] and "gold_reward" in records[-1]
    assert os.path.getsize(out / "reward_vs_kl.png") > 1000
    from PIL import Image
    with Image.open(out / "reward_vs_kl.png") as image:  # the plot names what it plots
        assert image.text["Title"] == f"{algo}: gold reward vs KL to the initial model"
        assert image.text["Description"].startswith("y: gold reward (the task's true reward)")
    assert (out / "checkpoints" / "step-000002.pt").exists()


@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
def test_every_pairwise_loss_trains(tiny_task, loss):
    """Step 1 has policy == frozen reference: every implicit reward is exactly 0; then it moves."""
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    smoothing = 0.1 if loss in LABEL_SMOOTHING_NAMES else 0.0
    config = PreferenceConfig(loss=loss, beta=0.5, label_smoothing=smoothing,
                              batch_size=4, micro_batch_size=4, num_examples=8, eval_every=0, lr=0.01,
                              progress=False)
    trainer = PreferenceTrainer(tiny_task, config)
    first = trainer.train_step(1)
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0 and first["margin"] == 0.0
    assert math.isfinite(first["loss"]) and first["grad_norm"] > 0
    second = trainer.train_step(2)
    assert math.isfinite(second["loss"]) and second["margin"] != 0.0


@pytest.mark.parametrize("loss", UNPAIRED_LOSSES)
def test_every_unpaired_loss_trains(tiny_task, loss):
    """Step 1 has policy == frozen reference: every log-ratio, and KTO's KL estimate, is 0, so
    each example's loss is sigmoid(0) = 1/2; then it moves. apo_zero_unpaired scores no
    mismatched pairs and logs no kto_kl."""
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    config = PreferenceConfig(loss=loss, beta=0.5, batch_size=4, micro_batch_size=2, num_examples=8,
                              eval_every=0, lr=0.01, progress=False)
    trainer = PreferenceTrainer(tiny_task, config)
    assert ("mismatched" in trainer.data) == (loss == "kto")
    first = trainer.train_step(1)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["grad_norm"] > 0
    assert first["desirable_reward"] == 0.0 and first["undesirable_reward"] == 0.0
    assert ("kto_kl" in first) == (loss == "kto") and first.get("kto_kl", 0.0) == 0.0
    second = trainer.train_step(2)
    assert math.isfinite(second["loss"]) and second["desirable_reward"] != 0.0


def test_kto_algo_config_can_swap_in_apo_zero_unpaired(tmp_path, task_cache_dir):
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="tr-kto", loss="apo_zero_unpaired",
                          **dict(PREFERENCE, eval_every=0, tr_tau=1))
    assert run_cli("--config", config, "--steps", 2, "--out", tmp_path / "out") == 0
    steps = [r for r in read_records(tmp_path / "out") if not r.get("final")]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and "kto_kl" not in r for r in steps)


def test_first_dpo_loss_is_log_two(tiny_task):
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    trainer = PreferenceTrainer(tiny_task, PreferenceConfig(batch_size=4, micro_batch_size=2, num_examples=8,
                                                            eval_every=0, progress=False))
    assert trainer.train_step(1)["loss"] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("algo", ["tr-dpo", "tr-kto"])
def test_gradient_accumulation_does_not_change_the_numbers(tmp_path, task_cache_dir, algo):
    """1, 2 or 4 micro-batches per step: the same loss curve (KTO's z0 is a whole-batch
    statistic). RL rollouts are seeded per micro-batch, so for RL the invariance is to the
    number of ranks at a fixed micro_batch_size (test_distributed.py)."""
    base = dict(PREFERENCE, batch_size=4, tr_tau=2)
    curves = []
    for micro in (4, 2, 1):
        config = write_config(tmp_path / f"{micro}.toml", task_cache_dir, algo=algo,
                              **dict(base, micro_batch_size=micro, eval_every=0))
        assert run_cli("--config", config, "--steps", 3, "--out", tmp_path / str(micro)) == 0
        curves.append([r["loss"] for r in read_records(tmp_path / str(micro)) if not r.get("final")])
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=1e-5, abs=1e-6)


def test_bf16_autocast_runs(tmp_path, task_cache_dir):
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="dpo", **dict(PREFERENCE, eval_every=0))
    assert run_cli("--config", config, "--steps", 2, "--out", tmp_path / "out", "--bf16") == 0
    losses = [r["loss"] for r in read_records(tmp_path / "out") if not r.get("final")]
    assert all(math.isfinite(v) for v in losses) and losses[0] == pytest.approx(math.log(2), abs=1e-2)


def test_local_hf_model_directory(tmp_path, task_cache_dir, tiny_task):
    tiny_task.new_policy().save_pretrained(tmp_path / "model")
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="rloo", **dict(RL, eval_every=0))
    assert run_cli("--config", config, "--steps", 1, "--out", tmp_path / "out",
                   "--model", tmp_path / "model") == 0
    assert "gold_reward" in read_records(tmp_path / "out")[0]


def test_logits_path_eager_backend_and_packed_rows_match_the_fused_default(tmp_path, task_cache_dir):
    """fused_linear=false (logits + pyalign.token_logprobs) on the eager backend, and
    padding_free=true (each batch's rows packed into one sequence), give the loss curve of the
    default (pyalign.linear_token_logprobs on the auto backend, padded rows)."""
    backend_before = os.environ.get("PYALIGN_BACKEND")
    curves = []
    variants = (("fused", {}, []), ("logits", {"fused_linear": False}, ["--backend", "eager"]),
                ("packed", {"padding_free": True}, []))
    for name, extra, flags in variants:
        config = write_config(tmp_path / f"{name}.toml", task_cache_dir, algo="tr-dpo",
                              **dict(PREFERENCE, eval_every=0, tr_tau=1, **extra))
        assert run_cli("--config", config, "--steps", 3, "--out", tmp_path / name, *flags) == 0
        curves.append([r["loss"] for r in read_records(tmp_path / name) if not r.get("final")])
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=1e-5, abs=1e-6)
    assert len(set(curves[0])) == 3
    assert os.environ.get("PYALIGN_BACKEND") == backend_before  # --backend does not leak
