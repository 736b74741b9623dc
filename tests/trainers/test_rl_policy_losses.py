"""RLTrainer with the registry's policy losses (``loss_type``) and PPO-style iterations
(``num_iterations``): RLOO stays the default and its gradient is the REINFORCE surrogate's at
ratio 1; every policy loss trains; more iterations clip; bad values are one-line config errors
before any work."""
import math

import pytest
import torch
from trainer_helpers import TINY_TASK, read_records, run_cli, write_config

import pyalign
from pyalign import losses
from pyalign.trainers import RLConfig, RLTrainer

RL = dict(batch_size=2, micro_batch_size=1, samples_per_prompt=2, eval_every=0, progress=False,
          lr=0.01)


def test_defaults_are_todays_rloo():
    config = RLConfig()
    assert (config.loss_type, config.num_iterations, config.epsilon, config.epsilon_high) == \
        ("rloo", 1, 0.2, None)


def test_rloo_at_ratio_one_has_the_reinforce_gradient():
    """What the trainer did before loss_type existed: -(1/n)·Σ A_i·log π(y_i|x); the default loss
    (rloo, one iteration) scaled by the micro-batch's share gives the same gradient."""
    logprobs = -torch.rand(6, 9) * 3
    mask = torch.rand(6, 9) > 0.3
    mask[:, 0] = True
    advantages = torch.randn(6)
    reinforce = logprobs.clone().requires_grad_(True)
    (-(advantages * pyalign.sequence_logprobs(reinforce, mask)).sum() / 12).backward()
    ours = logprobs.clone().requires_grad_(True)
    out = pyalign.policy_loss(ours, None, advantages, mask, loss_type="rloo")
    (out.loss * (6 / 12)).backward()
    torch.testing.assert_close(ours.grad, reinforce.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", losses.POLICY_NAMES)
def test_every_policy_loss_trains(tiny_task, loss_type):
    trainer = RLTrainer(tiny_task, RLConfig(loss_type=loss_type, num_iterations=2,
                                            epsilon_high=5.0 if loss_type == "cispo" else None,
                                            **RL))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    record = trainer.train_step(1)
    for key in ("loss", "policy_loss", "reward", "kl_penalty", "clip_ratio", "grad_norm"):
        assert math.isfinite(record[key]), (loss_type, key)
    assert 0.0 <= record["clip_ratio"] <= 1.0
    moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(),
                                                      strict=True))
    assert moved, loss_type


def test_more_iterations_clip_and_run_from_the_cli(tmp_path, task_cache_dir):
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="rloo", batch_size=2,
                          micro_batch_size=2, samples_per_prompt=2, eval_batch_size=2,
                          final_eval_batch_size=2, lr=0.05, loss_type="grpo", num_iterations=3,
                          epsilon=0.01)
    assert run_cli("--config", config, "--steps", 2, "--out", tmp_path / "out") == 0
    steps = [r for r in read_records(tmp_path / "out") if not r.get("final")]
    assert all(math.isfinite(r["clip_ratio"]) for r in steps)
    assert any(r["clip_ratio"] > 0 for r in steps)  # ε = 0.01 and lr 0.05: the later passes clip


@pytest.mark.parametrize("values, key, shown", [
    (dict(loss_type="ppo"), "loss_type", "ppo"),
    (dict(num_iterations=0), "num_iterations", "0"),
    (dict(epsilon=-0.5), "epsilon", "-0.5"),
    (dict(epsilon_high=-1.0), "epsilon_high", "-1.0"),
    (dict(loss_type="cispo", epsilon=0.0), "epsilon_high", "cispo"),
])
def test_bad_values_are_one_line_config_errors(tmp_path, capsys, values, key, shown):
    cache = tmp_path / "cache"
    lines = [f'task_cache_dir = "{cache}"', 'algo = "rloo"']
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items()]
    lines += ["[task]"] + [f"{k} = {v!r}" for k, v in TINY_TASK.items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_cli("--config", path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0] and shown in err[0], err
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_grpo_advantages_are_trls(tiny_task):
    """GRPO's advantages for scale_rewards group, batch and none: (r - group mean) / (std +
    1e-4) with TRL's own nanstd (unbiased), in float64; a group of equal rewards gets 0."""
    nanstd = pytest.importorskip("trl.trainer.utils", reason="trl is not installed ([test] extra)").nanstd
    trainer = RLTrainer(tiny_task, RLConfig(**{**RL, "adv_estimator": "grpo", "samples_per_prompt": 3}))
    rewards = torch.randn(4, 3) * torch.tensor([[1.0], [0.0], [3.0], [0.5]]) + 2.0
    double = rewards.double()
    centred = double - double.mean(1, keepdim=True)
    expected = {"group": centred / (nanstd(double, dim=1, keepdim=True) + 1e-4),
                "batch": centred / (nanstd(double) + 1e-4), "none": centred}
    for scale, want in expected.items():
        trainer.config.scale_rewards = scale
        rollouts = [{"rewards": rewards[:1].reshape(-1)}, {"rewards": rewards[1:].reshape(-1)}]
        trainer._grpo_advantages(rollouts)
        got = torch.cat([r["advantages"] for r in rollouts]).view(4, 3)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, msg=scale)
        assert torch.equal(got[1], torch.zeros(3))  # equal rewards: no signal
