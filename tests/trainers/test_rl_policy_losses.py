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


def _config_error_lines(tmp_path, capsys, values: dict) -> list[str]:
    """pyalign train on an rloo config with ``values``: it exits 2 before any work (no task
    cache, no output directory); the lines it wrote to stderr."""
    cache = tmp_path / "cache"
    lines = [f'task_cache_dir = "{cache}"', 'algo = "rloo"']
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items()]
    lines += ["[task]"] + [f"{k} = {v!r}" for k, v in TINY_TASK.items()]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run_cli("--config", path, "--out", tmp_path / "out") == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("values, key, shown", [
    (dict(loss_type="ppo"), "loss_type", "ppo"),
    (dict(num_iterations=0), "num_iterations", "0"),
    (dict(epsilon=-0.5), "epsilon", "-0.5"),
    (dict(epsilon_high=-1.0), "epsilon_high", "-1.0"),
    (dict(loss_type="cispo", epsilon=0.0), "epsilon_high", "cispo"),
])
def test_bad_values_are_one_line_config_errors(tmp_path, capsys, values, key, shown):
    err = _config_error_lines(tmp_path, capsys, values)
    assert len(err) == 1 and f"'{key}'" in err[0] and shown in err[0], err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


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


# ------------------------------------------------------------- a sampler that is not the policy

SAMPLING_KEYS = ("sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
                 "sampling/importance_sampling_ratio/max",
                 "sampling/importance_sampling_masked_fraction",
                 "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")


def test_the_policy_samples_itself_by_default(tiny_task):
    """No sampler_dtype: no sampler copy, no rollout log-probs, no sampling metrics (the
    correction is a no-op: the embedded runs keep their numbers)."""
    config = RLConfig(**RL)
    assert config.sampler_dtype is None
    trainer = RLTrainer(tiny_task, config)
    assert trainer.sampler is None
    record = trainer.train_step(1)
    assert not any(key.startswith("sampling/") for key in record)


def test_a_bf16_sampler_feeds_its_logprobs_to_the_correction(tiny_task, monkeypatch):
    """sampler_dtype=bfloat16: a bf16 copy of the policy, synced before the rollouts, samples;
    its log-probs of the samples reach policy_loss as rollout_logprobs with the run's options, and
    the step logs TRL's sampling metrics (a small mismatch: ratios near 1)."""
    config = RLConfig(**RL, adv_estimator="grpo", loss_type="dapo", sampler_dtype="bfloat16",
                      vllm_importance_sampling_mode="token_truncate",
                      vllm_importance_sampling_clip_min=0.5)
    trainer = RLTrainer(tiny_task, config)
    assert all(p.dtype == torch.bfloat16 for p in trainer.sampler.parameters())
    calls = []
    policy_loss = pyalign.policy_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return policy_loss(*args, **kwargs)
    monkeypatch.setattr(pyalign, "policy_loss", spy)
    with torch.no_grad():  # the policy moves; the sampler must follow it before sampling
        for param in trainer.policy.parameters():
            param.add_(0.01)
    record = trainer.train_step(1)
    for want, got in zip(trainer.policy.parameters(), trainer.sampler.parameters(), strict=True):
        assert not torch.equal(got, want.detach().to(torch.bfloat16))  # the step moved the policy
    assert calls and all(call["rollout_logprobs"] is not None for call in calls)
    assert {call["vllm_importance_sampling_mode"] for call in calls} == {"token_truncate"}
    rollout = calls[0]["rollout_logprobs"]
    assert rollout.dtype == torch.float32 and torch.isfinite(rollout).all()
    for key in SAMPLING_KEYS:
        assert math.isfinite(record[key]), key
    assert 0.5 <= record["sampling/importance_sampling_ratio/min"] <= 1.0 \
        <= record["sampling/importance_sampling_ratio/max"] <= 3.0
    assert 0 < record["sampling/sampling_logp_difference/mean"] < 0.2  # bf16's rounding
    assert record["sampling/importance_sampling_masked_fraction"] == 0  # truncated, not masked


def test_the_sampler_tracks_the_policy(tiny_task, monkeypatch):
    """Each step's rollouts are sampled by the sampler holding the policy's weights of that
    moment, rounded to its dtype, and never by the policy itself."""
    trainer = RLTrainer(tiny_task, RLConfig(**RL, sampler_dtype="float16"))
    seen = []
    generate = type(tiny_task).generate

    def spy(task, model, prompts, **kwargs):
        seen.append((model, [p.detach().clone() for p in model.parameters()]))
        return generate(task, model, prompts, **kwargs)
    monkeypatch.setattr(type(tiny_task), "generate", spy)
    for step in (1, 2):
        policy_now = [p.detach().to(torch.float16) for p in trainer.policy.parameters()]
        seen.clear()
        trainer.train_step(step)
        assert seen and all(model is trainer.sampler for model, _ in seen)
        for _, weights in seen:
            assert all(torch.equal(got, want) for got, want in zip(weights, policy_now, strict=True))


@pytest.mark.parametrize("values, key", [
    (dict(vllm_importance_sampling_mode="token_mask"), "vllm_importance_sampling_mode"),
    (dict(sampler_dtype="bfloat16", vllm_importance_sampling_mode="tis"),
     "vllm_importance_sampling_mode"),
    (dict(sampler_dtype="int8"), "sampler_dtype"),
    (dict(sampler_dtype="bfloat16", vllm_importance_sampling_clip_min=4.0),
     "vllm_importance_sampling_clip_min"),
    (dict(sampler_dtype="bfloat16", loss_type="vespo"), "vllm_importance_sampling_mode"),
    (dict(sampler_dtype="bfloat16", vllm_importance_sampling_clip_max=0.0),
     "vllm_importance_sampling_clip_max"),
])
def test_bad_sampler_settings_are_one_line_config_errors(tmp_path, capsys, values, key):
    err = _config_error_lines(tmp_path, capsys, values)
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
