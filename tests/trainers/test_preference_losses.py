"""PreferenceTrainer with TRL's loss options: a weighted combination (MPO), f-divergences,
LD-DPO and WPO weighting train a few steps; the CLI takes a list of losses from a config file;
bad options are config errors before anything runs."""
import math
import re

import pytest
from trainer_helpers import read_records, run_cli, write_config

CASES = [
    dict(loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss=["sigmoid_norm", "ipo"], f_divergence="js_divergence", ld_alpha=0.5),
    dict(loss=["aot", "hinge"], loss_weights=[1.0, 0.5]),
    dict(loss="sigmoid", use_weighting=True, f_divergence="alpha_divergence",
         f_alpha_divergence_coef=0.7),
]


@pytest.mark.parametrize("options", CASES, ids=["mpo", "fdiv-ld", "aot-hinge", "wpo-alpha"])
def test_loss_options_train(tiny_task, options):
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    config = PreferenceConfig(beta=0.5, batch_size=4, micro_batch_size=4, num_examples=8,
                              eval_every=0, lr=0.01, progress=False, **options)
    trainer = PreferenceTrainer(tiny_task, config)
    first = trainer.train_step(1)
    assert first["margin"] == 0.0 and math.isfinite(first["loss"]) and first["grad_norm"] > 0
    second = trainer.train_step(2)
    assert math.isfinite(second["loss"]) and second["margin"] != 0.0


def test_mpo_first_step_is_its_formula(tiny_task):
    """Policy == reference at step 1: sigmoid and bco_pair give log 2 and 2 log 2 per pair, sft the
    mean NLL of the chosen tokens (positive)."""
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    base = dict(beta=0.5, batch_size=4, micro_batch_size=4, num_examples=8, eval_every=0,
                progress=False)
    pair_part = PreferenceTrainer(tiny_task, PreferenceConfig(
        loss=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], **base)).train_step(1)["loss"]
    assert pair_part == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2), rel=1e-6)
    with_sft = PreferenceTrainer(tiny_task, PreferenceConfig(
        loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **base)).train_step(1)
    assert with_sft["loss"] > pair_part


def test_cli_takes_a_list_of_losses(tmp_path, task_cache_dir):
    config = write_config(tmp_path / "c.toml", task_cache_dir, algo="dpo", batch_size=4,
                          micro_batch_size=2, num_examples=8, eval_batch_size=4,
                          final_eval_batch_size=4, loss=["sigmoid", "bco_pair", "sft"],
                          loss_weights=[0.8, 0.2, 1.0], f_divergence="reverse_kl")
    assert run_cli("--config", config, "--steps", 2, "--out", tmp_path / "out") == 0
    steps = [r for r in read_records(tmp_path / "out") if not r.get("final")]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


@pytest.mark.parametrize("values,match", [
    (dict(algo="dpo", loss=["sigmoid", "dpo"]), "loss 'dpo' is not a pairwise loss"),
    (dict(algo="dpo", loss=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights must be a list of 2"),
    (dict(algo="dpo", loss="bco_pair", f_divergence="forward_kl"), r"not to \['bco_pair'\]"),
    (dict(algo="dpo", loss="aot", use_weighting=True), r"use_weighting .* \['aot'\]"),
    (dict(algo="ipo", ld_alpha=0.5), "ld_alpha .* length_normalize"),
    (dict(algo="dpo", ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
    (dict(algo="kto", ld_alpha=0.5), "key 'ld_alpha' does not apply to algo kto"),
    (dict(algo="dpo", loss_weights="x"), "loss_weights"),
])
def test_bad_loss_options_are_config_errors(tmp_path, task_cache_dir, capsys, values, match):
    config = write_config(tmp_path / "c.toml", task_cache_dir, batch_size=4, micro_batch_size=2,
                          num_examples=8, **values)
    assert run_cli("--config", config, "--steps", 1, "--out", tmp_path / "out") != 0
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert re.search(match, error), error


def test_reference_free_step_scores_the_policy_alone(tiny_task):
    """reference = "none" (what SimPO/CPO/ORPO presets fix): the implicit rewards are beta times
    the policy's own sequence log-probs, and the sigmoid loss is on their margin (float64
    oracle on the same rows); KTO's losses, which need a reference, are refused."""
    import torch
    import torch.nn.functional as F

    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    config = PreferenceConfig(reference="none", beta=0.5, batch_size=4, micro_batch_size=2,
                              num_examples=8, eval_every=0, lr=0.01, progress=False)
    trainer = PreferenceTrainer(tiny_task, config)
    rows = trainer.batch_indices(1)
    with torch.no_grad():
        logps = {}
        for key in ("chosen", "rejected"):
            prompts, responses = trainer.data["prompt"][rows], trainer.data[key][rows]
            model = trainer.policy.double()
            logits = model(input_ids=torch.cat([prompts, responses], 1)).logits[:, prompts.shape[1] - 1:-1]
            logps[key] = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0].sum(-1)
        trainer.policy.float()
    first = trainer.train_step(1)
    margin = 0.5 * (logps["chosen"] - logps["rejected"])
    assert first["chosen_reward"] == pytest.approx(float(0.5 * logps["chosen"].mean()), rel=1e-5)
    assert first["loss"] == pytest.approx(float(-F.logsigmoid(margin).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="'reference' = 'none' takes a pairwise loss"):
        PreferenceConfig(reference="none", loss="kto").validate()


def _policy_logps64(trainer, rows):
    """float64 (sum, token count) [B] of the chosen and the rejected responses under the policy."""
    import torch
    out = {}
    with torch.no_grad():
        model = trainer.policy.double()
        for key in ("chosen", "rejected"):
            prompts, responses = trainer.data["prompt"][rows], trainer.data[key][rows]
            mask = trainer.response_mask(responses)
            logits = model(input_ids=torch.cat([prompts, responses], 1)).logits
            logits = logits[:, prompts.shape[1] - 1:-1]
            tokens = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
            out[key] = (torch.where(mask, tokens, 0.0).sum(-1), mask.sum(-1).double())
        trainer.policy.float()
    return out


@pytest.mark.parametrize("algo", ["simpo", "cpo", "orpo"])
def test_reference_free_presets_are_trls_loss_on_the_first_step(tiny_task, algo):
    """Each preset's first step is TRL's loss (CPOTrainer with loss_type simpo and cpo_alpha 0,
    with sigmoid and cpo_alpha 1; ORPOTrainer) in float64 on the policy's own log-probs: SimPO
    and ORPO on per-token means, CPO on sums, plus cpo_alpha x the mean NLL of the chosen
    tokens (ORPO: 1); the rewards are beta x those log-probs."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from pyalign.trainers import PreferenceTrainer
    from pyalign.trainers.presets import ALGOS
    beta, gamma = 0.7, 0.3
    config = dataclasses.replace(ALGOS[algo].preset_config(), beta=beta, batch_size=4,
                                 micro_batch_size=4, num_examples=8, eval_every=0, progress=False,
                                 **({"simpo_gamma": gamma} if algo == "simpo" else {}))
    trainer = PreferenceTrainer(tiny_task, config)
    logps = _policy_logps64(trainer, trainer.batch_indices(1))
    (chosen_sum, chosen_count), (rejected_sum, rejected_count) = logps["chosen"], logps["rejected"]
    nll = -chosen_sum.sum() / chosen_count.sum()
    chosen_mean, rejected_mean = chosen_sum / chosen_count, rejected_sum / rejected_count
    if algo == "simpo":
        expected = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma).mean()
        chosen = chosen_mean
    elif algo == "cpo":
        expected = -F.logsigmoid(beta * (chosen_sum - rejected_sum)).mean() + nll
        chosen = chosen_sum
    else:
        def log_odds(p):
            return p - torch.log(-torch.expm1(p))
        expected = -beta * F.logsigmoid(log_odds(chosen_mean) - log_odds(rejected_mean)).mean() + nll
        chosen = chosen_mean
    first = trainer.train_step(1)
    assert first["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert first["chosen_reward"] == pytest.approx(float(beta * chosen.mean()), rel=1e-5)
    assert math.isfinite(trainer.train_step(2)["loss"])


@pytest.mark.parametrize("values,match", [
    (dict(algo="dpo", cpo_alpha=0.5), "key 'cpo_alpha' does not apply to algo dpo .* simpo, cpo"),
    (dict(algo="orpo", cpo_alpha=0.5), "key 'cpo_alpha' is set by --algo orpo"),
    (dict(algo="cpo", simpo_gamma=1.0), "key 'simpo_gamma' does not apply to algo cpo .* simpo"),
    (dict(algo="cpo", loss=["cpo", "sft"]), "holds sft, which cpo_alpha adds already"),
    (dict(algo="simpo", cpo_alpha=-1.0), "'cpo_alpha' must be >= 0"),
    (dict(algo="simpo", ld_alpha=0.5), "'reference' = 'none' takes a pairwise loss without ld_alpha"),
])
def test_bad_reference_free_options_are_config_errors(tmp_path, task_cache_dir, capsys, values,
                                                      match):
    config = write_config(tmp_path / "c.toml", task_cache_dir, batch_size=4, micro_batch_size=2,
                          num_examples=8, **values)
    assert run_cli("--config", config, "--steps", 1, "--out", tmp_path / "out") != 0
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert re.search(match, error), error
