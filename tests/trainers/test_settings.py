"""The run settings, declared once (pyalign/trainers/settings.py, fields.py): every setting is a
flag (TRL's names too) and a config key; a run on one's own model starts from the defaults of
TRL 1.16's own config classes (read from the installed trl here, not restated); the embedded
task keeps its tuned defaults; the steps follow from rows x epochs; the learning-rate schedule
is transformers' own."""
import argparse
import dataclasses
import json
import math

import pytest

from pyalign.cli.train import add_train_arguments, given_on_command_line
from pyalign.trainers import PreferenceConfig, RLConfig
from pyalign.trainers.fields import declared
from pyalign.trainers.presets import ALGOS, algorithms_for
from pyalign.trainers.resolve import resolve, resolve_config_values
from pyalign.trainers.settings import ConfigError, RunSettings, load_config_file, printed_settings

TRL_FLAGS = ["--learning-rate", "1e-6", "--beta", "0.2", "--per-device-batch-size", "2",
             "--gradient-accumulation-steps", "3", "--num-epochs", "1", "--warmup-ratio", "0.1",
             "--max-grad-norm", "0.5", "--eval-every", "7", "--seed", "5", "--bf16"]


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return given_on_command_line(parser.parse_args([str(a) for a in argv]))


def _trl_defaults(cls) -> dict:
    """The field defaults of one of TRL's config classes (no instance: it checks the device)."""
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


def test_every_setting_is_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    options = {o for action in parser._actions for o in action.option_strings}
    classes = {RunSettings, *(a.config_class for a in ALGOS.values())}
    for cls in classes:
        for name, field in declared(cls).items():
            for alias in (name, *field.metadata["aliases"]):
                assert f"--{alias.replace('_', '-')}" in options, alias
            assert field.metadata["help"], name
    for flag in TRL_FLAGS[::2] + ["--lr", "--max-steps", "--report-to", "--num-generations"]:
        assert flag in options, flag


def test_trl_named_flags_reach_the_config():
    given = _parse("--algo", "dpo", *TRL_FLAGS)
    _, run, config = resolve([("command line", given)])
    assert (config.lr, config.beta, config.warmup_ratio, config.max_grad_norm, config.eval_every,
            config.seed, config.bf16) == (1e-6, 0.2, 0.1, 0.5, 7, 5, True)
    assert (config.micro_batch_size, config.batch_size) == (2, 6)  # per device x accumulation
    assert run["num_epochs"] == 1.0 and run["steps"] == math.ceil(config.num_examples / 6)
    # an alias and its setting in one source, or both spellings of the batch: refused by name
    with pytest.raises(ConfigError, match="'lr' and 'learning_rate' are two names"):
        resolve([("command line", _parse("--algo", "dpo", "--lr", "1", "--learning-rate", "2"))])
    with pytest.raises(ConfigError, match="two spellings of the batch"):
        resolve([("command line", _parse("--algo", "dpo", "--batch-size", "4",
                                         "--per-device-batch-size", "2"))])


def test_rl_beta_is_the_kl_coefficient_and_groups_count_completions():
    _, _, config = resolve([("command line", _parse("--algo", "grpo", "--beta", "0.04",
                                                    "--per-device-batch-size", "8",
                                                    "--num-generations", "4"))])
    assert (config.kl_coef, config.samples_per_prompt, config.micro_batch_size, config.batch_size) == \
        (0.04, 4, 2, 2)  # 8 completions per device: 2 prompts of 4
    with pytest.raises(ConfigError, match="must be a multiple of that, got 6"):
        resolve([("command line", _parse("--algo", "grpo", "--per-device-batch-size", "6",
                                         "--num-generations", "4"))])


def _model_run(algo, model_dir, data=None, **flags):
    values = dict(algo=algo, model=model_dir, **flags)
    if data:
        values["data"] = data
    return resolve_config_values(values, "test")


@pytest.mark.parametrize("algo, trl_class", [("dpo", "DPOConfig"), ("tr-dpo", "DPOConfig"),
                                             ("kto", "KTOConfig"), ("ipo", "DPOConfig")])
def test_own_model_preference_defaults_are_trls(algo, trl_class, tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed ([test] extra)")
    trl_defaults = _trl_defaults(getattr(trl, trl_class))
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 20
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, run, config = _model_run(algo, tiny_model_dir, str(data))
    assert config.lr == trl_defaults["learning_rate"]
    assert config.micro_batch_size == config.batch_size == trl_defaults["per_device_train_batch_size"]
    assert run["num_epochs"] == trl_defaults["num_train_epochs"]
    assert config.lr_scheduler_type == str(getattr(trl_defaults["lr_scheduler_type"], "value",
                                                   trl_defaults["lr_scheduler_type"]))
    assert (config.max_grad_norm, config.weight_decay, config.warmup_steps) == \
        (trl_defaults["max_grad_norm"], trl_defaults["weight_decay"], trl_defaults["warmup_steps"])
    assert config.beta == trl_defaults["beta"]
    assert run["max_length"] == min(trl_defaults["max_length"], 128)  # the tiny model's positions
    assert config.eval_every == 0 and config.final_eval_batch_size == 0  # TRL: eval_strategy "no"
    if algo.startswith("tr-"):
        assert (config.tr_alpha, config.tr_tau) == (trl_defaults["ref_model_mixup_alpha"],
                                                    trl_defaults["ref_model_sync_steps"])
    examples = 2 * len(rows) if algo == "kto" else len(rows)  # KTO: a pair gives two rows
    assert config.num_examples == examples
    assert run["steps"] == math.ceil(examples * run["num_epochs"] / config.batch_size)
    # --print-config of such a run reads back to the same settings (the row count commented)
    printed = "\n".join(printed_settings(algo, run, config))
    assert f"# num_examples = {examples}   (the rows of {data})" in printed
    (tmp_path / "printed.toml").write_text(printed)
    assert resolve_config_values(load_config_file(str(tmp_path / "printed.toml")), "x") == \
        (algo, run, config)


@pytest.mark.parametrize("algo, trl_class", [("grpo", "GRPOConfig"), ("rloo", "RLOOConfig")])
def test_own_model_rl_defaults_are_trls(algo, trl_class, tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed ([test] extra)")
    trl_defaults = _trl_defaults(getattr(trl, trl_class))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(12)))
    _, run, config = _model_run(algo, tiny_model_dir, str(data), reward="x.py:f")
    k = trl_defaults["num_generations"]
    assert config.samples_per_prompt == k
    assert config.batch_size * k == trl_defaults["per_device_train_batch_size"]  # completions
    assert (config.lr, config.kl_coef, config.epsilon, config.epsilon_high, config.temperature,
            config.num_iterations) == \
        (trl_defaults["learning_rate"], trl_defaults["beta"], trl_defaults["epsilon"],
         trl_defaults["epsilon_high"], trl_defaults["temperature"], trl_defaults["num_iterations"])
    assert run["max_completion_length"] == trl_defaults["max_completion_length"]
    if algo == "grpo":
        assert (config.loss_type, config.scale_rewards, config.kl_estimator) == \
            (trl_defaults["loss_type"], trl_defaults["scale_rewards"], "k3")
    assert run["steps"] == math.ceil(12 * trl_defaults["num_train_epochs"] / config.batch_size)


def test_embedded_task_keeps_its_tuned_defaults():
    for algo, algorithm in ALGOS.items():
        _, run, config = resolve_config_values({"algo": algo}, "test")
        preset = algorithm.config_class(**algorithm.fixed, **algorithm.defaults, **{
            k: v for k, v in algorithm.tuned.items() if k != "steps"})
        assert config == preset, algo
        assert run["steps"] == (100 if algorithm.family == "preference" else 60)
    _, _, ipo = resolve_config_values({"algo": "ipo"}, "test")
    assert (ipo.beta, ipo.lr, ipo.batch_size, ipo.eval_every) == (0.5, 1e-3, 32, 1)
    assert RLConfig().lr == PreferenceConfig().lr == 1e-3


def test_eval_data_turns_evaluation_on(tiny_model_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n"
                            for _ in range(8)))
    _, _, config = _model_run("dpo", tiny_model_dir, str(data), eval_data=str(data))
    assert config.eval_every == 10 and config.final_eval_batch_size == config.eval_batch_size


def test_which_keys_apply_is_derived_from_the_presets():
    assert algorithms_for("tr_alpha", "preference") == ["tr-dpo", "tr-ipo", "tr-kto"]
    assert algorithms_for("desirable_weight", "preference") == ["kto", "tr-kto"]
    assert algorithms_for("precompute_ref", "preference") == ["dpo", "ipo", "slic", "kto"]
    assert algorithms_for("er_reset_every", "rl") == ["elastic-reset"]
    assert algorithms_for("scale_rewards", "rl") == ["grpo"]
    # Elastic Reset on top of GRPO: its estimator is free, and scale_rewards then applies
    _, _, config = resolve_config_values({"algo": "elastic-reset", "adv_estimator": "grpo",
                                          "scale_rewards": "batch", "loss_type": "dapo"}, "test")
    assert config.elastic_reset and config.scale_rewards == "batch"
    with pytest.raises(ConfigError, match="'scale_rewards' does not apply to algo rloo"):
        resolve_config_values({"algo": "rloo", "scale_rewards": "batch"}, "test")
    with pytest.raises(ConfigError, match="'adv_estimator' is set by --algo grpo"):
        resolve_config_values({"algo": "grpo", "adv_estimator": "rloo"}, "test")


def test_a_frozen_reference_may_become_bema_and_only_that_one():
    # TRL's BEMACallback on a DPO run: --algo dpo --reference bema with the bema_* keys
    _, _, config = resolve([("command line", _parse("--algo", "dpo", "--reference", "bema",
                                                    "--bema-update-freq", "7"))])
    assert (config.reference, config.bema_update_freq) == ("bema", 7)
    assert algorithms_for("bema_lag", "preference") == []  # no preset moves by BEMA itself
    with pytest.raises(ConfigError, match="'bema_lag' does not apply"):
        resolve_config_values({"algo": "dpo", "bema_lag": 3.0}, "test")
    with pytest.raises(ConfigError, match="'reference' is set by --algo tr-dpo"):
        resolve_config_values({"algo": "tr-dpo", "reference": "bema"}, "test")


def test_linear_schedule_is_transformers():
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pyalign.trainers.trainer import learning_rate
    config = PreferenceConfig(lr=0.3, lr_scheduler_type="linear")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, 7)
    for step in range(1, 8):
        assert learning_rate(config, step, 7) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                               rel=1e-12)
        optimizer.step()
        schedule.step()
    warm = PreferenceConfig(lr=0.3, warmup_ratio=0.25)
    assert [learning_rate(warm, s, 8) for s in (1, 2, 3)] == pytest.approx([0.15, 0.3, 0.3])


@pytest.mark.parametrize("algo, module, trl_class", [
    ("simpo", "cpo", "CPOConfig"), ("cpo", "cpo", "CPOConfig"), ("orpo", "orpo", "ORPOConfig")])
def test_own_model_reference_free_defaults_are_trls(algo, module, trl_class, tiny_model_dir,
                                                    tmp_path):
    """TRL's CPOConfig / ORPOConfig defaults; SimPO is CPOConfig(loss_type="simpo", cpo_alpha=0),
    as TRL's documentation sets it (CPO-SimPO: --cpo-alpha > 0); ORPO's NLL weight is 1."""
    pytest.importorskip("trl", reason="trl is not installed ([test] extra)")
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_defaults = _trl_defaults(getattr(importlib.import_module(f"trl.experimental.{module}"),
                                             trl_class))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a b", "chosen": " c", "rejected": " d"}) + "\n"
                            for _ in range(20)))
    _, run, config = _model_run(algo, tiny_model_dir, str(data))
    assert (config.lr, config.beta, config.label_smoothing) == \
        (trl_defaults["learning_rate"], trl_defaults["beta"], trl_defaults.get("label_smoothing", 0.0))
    assert config.micro_batch_size == config.batch_size == trl_defaults["per_device_train_batch_size"]
    assert run["num_epochs"] == trl_defaults["num_train_epochs"]
    assert config.reference == "none" and config.loss == algo
    if algo == "cpo":  # TRL's default loss_type: the sigmoid loss on the policy's log-probs
        assert trl_defaults["loss_type"] == "sigmoid"
    if module == "cpo":
        assert config.simpo_gamma == trl_defaults["simpo_gamma"]
        assert config.cpo_alpha == (0.0 if algo == "simpo" else trl_defaults["cpo_alpha"])
    else:
        assert config.cpo_alpha == 1.0
    assert config.length_normalize == (algo != "cpo")  # TRL averages for simpo and orpo


def test_reference_free_keys_apply_to_their_algorithms():
    assert algorithms_for("simpo_gamma", "preference") == ["simpo"]
    assert algorithms_for("cpo_alpha", "preference") == ["simpo", "cpo"]  # orpo fixes it
    assert algorithms_for("precompute_ref", "preference") == ["dpo", "ipo", "slic", "kto"]
