"""A study on one's own model and data (pyalign/study/userdata.py, data_evaluation.py), on a
tiny Llama and 64 preference rows (study_helpers.write_user_files): the held-out split, the
steps from the training part and the resolved batch, the points' configs, a preset on one's own
model, bad grids and bad inputs named before any point runs, and one evaluation against an
independent float64 computation from the model itself (KL, length, gold, preference accuracy,
margin, perplexity)."""
import copy
import importlib.util
import json
import math
import os

import pytest
import torch

from pyalign.study.grid import GridError, parse_grid
from pyalign.study.presets import PRESETS
from pyalign.study.runner import prepare
from pyalign.study.userdata import from_preset, heldout_rows, write_split
from pyalign.trainers.settings import load_config_file
from support import token_logprobs64


@pytest.fixture(autouse=True)
def _one_thread():
    from support import torch_threads
    with torch_threads(1):
        yield


def _spec(files, **extra) -> dict:
    return {"seeds": [0, 1, 2], "epochs": [0.25, 0.5, 1.0], "algos": {"dpo": {"beta": [0.1, 0.2]}},
            "model": files["model"], "data": files["prefs"], **extra}


def _rows(path) -> list:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_a_tenth_is_held_out_by_a_fixed_seed_and_the_points_train_on_the_rest(user_files, tmp_path):
    grid = parse_grid(_spec(user_files))
    from pyalign.trainers.fingerprints import content_digest  # pyalign train's fingerprint of --data
    assert grid.spec["data_split"] == {"format": "preference", "rows": 64, "train_rows": 58,
                                       "heldout_rows": 6, "heldout_format": "preference",
                                       "sha256": {"data": content_digest(user_files["prefs"])}}
    held = heldout_rows(64, 6)
    assert held == heldout_rows(64, 6) and len(set(held)) == 6 and held != list(range(6))
    files = write_split(grid.spec, str(tmp_path))
    original = _rows(user_files["prefs"])
    assert _rows(files["eval_data"]) == [original[i] for i in held]
    assert _rows(files["data"]) == [row for i, row in enumerate(original) if i not in held]
    # --eval-data replaces the split: the points train on every row of --data
    with_eval = parse_grid(_spec(user_files, eval_data=files["eval_data"]))
    assert with_eval.spec["data_split"]["train_rows"] == 64
    assert write_split(with_eval.spec, str(tmp_path / "other")) == {
        "data": user_files["prefs"], "eval_data": files["eval_data"]}


def test_a_study_resumed_on_other_data_is_refused(user_files, tmp_path):
    import shutil
    data = tmp_path / "prefs.jsonl"
    shutil.copy(user_files["prefs"], data)
    out = str(tmp_path / "study")
    prepare(parse_grid(_spec(user_files, data=str(data))), out)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same rows, reordered
    with pytest.raises(GridError, match="holds a study of another grid"):
        prepare(parse_grid(_spec(user_files, data=str(data))), out)


@pytest.mark.parametrize("algos, table, steps", [
    ({"dpo": {"beta": [0.1]}}, {}, (0, 2, 4, 8)),  # TRL's batch of 8: 58 rows, 8 steps an epoch
    ({"kto": {"beta": [0.1]}}, {}, (0, 4, 8, 15)),  # KTO on pairs: 116 examples
    ({"dpo": {"beta": [0.1]}}, {"per_device_batch_size": 4}, (0, 4, 8, 15)),
    ({"dpo": {"beta": [0.1], "num_epochs": 0.5}}, {}, (0, 2, 4)),  # the run's length
])
def test_steps_follow_the_training_part_and_the_batch_pyalign_train_resolves(user_files, algos, table, steps):
    grid = parse_grid(_spec(user_files, algos=algos, preference=table))
    assert grid.points()[0].eval_steps == steps
    assert "num_epochs" not in grid.points()[0].settings


def test_point_configs_on_ones_own_model(user_files, tmp_path):
    from pyalign.trainers.resolve import resolve_config_values
    gold = f"{user_files['gold']}:score"
    spec = _spec(user_files, algos={"dpo": {"beta": [0.1]}, "rloo": {"kl_coef": [0.05]}},
                 reward=gold, gold_reward=user_files["rm"], rl={"per_device_batch_size": 16})
    out = str(tmp_path / "study")
    jobs = prepare(parse_grid(spec), out)
    configs = {point.algo: load_config_file(path) for point, path in jobs}
    for algo, config in configs.items():
        assert config["data"] == os.path.join(out, "data", "train.jsonl")
        assert config["eval_data"] == os.path.join(out, "data", "heldout.jsonl")
        assert config["model"] == user_files["model"] and "task" not in config and "task_seed" not in config
        assert config["final_eval_batch_size"] == 0 and config["eval_every"] == 0
        assert config["study"]["gold_reward"] == user_files["rm"]
        _, run, _ = resolve_config_values(config, algo)  # a plain `pyalign train --config` file
        assert run["study"]["point_id"] == config["study"]["point_id"]
    assert configs["rloo"]["reward"] == gold and "reward" not in configs["dpo"]


def test_a_preset_keeps_its_knobs_and_rescales_its_periods_to_ones_own_epoch(user_files):
    user = {"model": user_files["model"], "data": user_files["prefs"]}
    spec = from_preset("quick", PRESETS["quick"], user)
    assert spec["epochs"] == [0.25, 0.5, 1.0] and "preference" not in spec and "budgets" not in spec
    assert spec["algos"]["dpo"] == PRESETS["quick"]["algos"]["dpo"]
    # the embedded quick study updates the reference every 16 and 32 of its 64 steps an epoch;
    # here an epoch is 8 steps (58 rows, batch 8)
    assert spec["algos"]["tr-dpo"] == {**PRESETS["quick"]["algos"]["tr-dpo"], "tr_tau": [2, 4]}
    assert PRESETS["quick"]["algos"]["tr-dpo"]["tr_tau"] == [16, 32]  # the preset is left as it is
    assert len(parse_grid(spec, "quick").points()) == 15
    with pytest.raises(GridError, match="preset 'lengthy' studies the embedded task"):
        from_preset("lengthy", PRESETS["lengthy"], user)


@pytest.mark.parametrize("change, message", [
    ({"data": None}, "--model needs --data"),
    ({"model": None, "data": None, "gold_reward": "gold.py:score"}, "--gold-reward need"),
    ({"sizes": ["small"]}, "'sizes' are for the embedded task"),
    ({"reward": "gold.py:score"}, "--reward is what the RL algorithms train on; this grid has none"),
    ({"data": "PROMPTS"}, "needs preference pairs"),
    ({"eval_data": "PREFS", "heldout_fraction": 0.2}, "give one of them"),
    ({"heldout_fraction": 1.5}, "must be a fraction in"),
    ({"preference": {"steps": 5}}, "the study sets for each point"),
    ({"rl": {"reward": "gold.py:score"}}, r"\[rl\] sets 'reward', which the study sets"),
    ({"data": "missing.jsonl"}, "--data .*missing.jsonl: no such file"),
    ({"rl": {"lr": 0.1}, "algos": {"rloo": {"kl_coef": [0.1]}}}, "needs --reward"),
])
def test_a_bad_grid_on_ones_own_model_is_named(user_files, change, message):
    paths = {"PROMPTS": user_files["prompts"], "PREFS": user_files["prefs"]}
    spec = _spec(user_files, **{k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(GridError, match=message):
        parse_grid(spec)


def _bad_row_file(tmp_path, user_files):
    rows = open(user_files["prefs"]).read().splitlines()
    rows[19] = json.dumps({"prompt": "a cat", "chosen": " yes"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "--data .*missing.jsonl: no such file"),
    (["--model", "no-such-model"], "--model .*no-such-model: not a directory"),
    (["--data", "BAD"], r"bad.jsonl line 20: missing column\(s\) 'rejected'"),
    (["--eval-data", "BAD"], r"bad.jsonl line 20: missing column\(s\) 'rejected'"),
    (["--gold-reward", "GOLD:nan"], "--gold-reward .*gold.py:nan returned nan on the first prompts"),
    (["--gold-reward", "GOLD:boom"], "--gold-reward .*gold.py:boom failed on the first prompts of .*: "
                                     "RuntimeError: this gold reward is broken"),
    (["--gold-reward", "GOLD:missing"], "--gold-reward .*gold.py has no function 'missing'"),
    (["--gold-reward", "no-such-rm"], "--gold-reward .*no-such-rm'?: expected path/to/file.py:function"),
])
def test_bad_inputs_are_named_before_any_point_runs(user_files, tmp_path, capsys, argv, message):
    import re

    from pyalign.cli.study import main
    swap = {"BAD": _bad_row_file(tmp_path, user_files), "GOLD:nan": f"{user_files['gold']}:nan",
            "GOLD:boom": f"{user_files['gold']}:boom", "GOLD:missing": f"{user_files['gold']}:missing"}
    given = dict(zip(argv[::2], [swap.get(a, a) for a in argv[1::2]]))
    flags = {"--model": user_files["model"], "--data": user_files["prefs"], **given}
    out = tmp_path / "study"
    code = main(["--preset", "quick", "--out", str(out), "--no-progress",
                 *[x for pair in flags.items() for x in pair]])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "points").exists()


def _sum_logprobs64(model, prompt, completion) -> float:
    """log p(completion | prompt) of an unpadded row, from the model's logits in float64."""
    prompt, completion = prompt[prompt >= 0], completion[completion >= 0]
    ids = torch.cat([prompt, completion])[None]
    logits = model(input_ids=ids).logits[0, prompt.shape[0] - 1:-1]
    return float(token_logprobs64(logits, completion).sum())


def test_one_evaluation_against_float64_from_the_model(user_files, tmp_path):
    from pyalign.study.evaluation import sample
    from pyalign.study.point import _trainer_and_evaluator
    from pyalign.trainers.resolve import resolve_config_values
    gold_spec = f"{user_files['gold']}:score"
    spec = _spec(user_files, gold_reward=gold_spec, seeds=[0], algos={"dpo": {"beta": [0.1]}},
                 preference={"lr": 0.05, "max_completion_length": 6}, eval={"prompts": 6, "heldout": 6})
    (point, path), = prepare(parse_grid(spec), str(tmp_path / "study"))
    algo, run, config = resolve_config_values(load_config_file(path), path)
    trainer, evaluator = _trainer_and_evaluator(algo, run, config)
    start = evaluator.evaluate(0)  # the initial model: no drift, every margin exactly 0
    assert (start["kl_to_init"], start["preference_margin"]) == (0.0, 0.0)
    assert start["preference_accuracy"] == start["train_preference_accuracy"] == 0.5
    trainer.train(4, progress=False, schedule_steps=point.steps)
    row = evaluator.evaluate(4)
    policy, initial = (copy.deepcopy(m).double().eval() for m in (trainer.policy, trainer.init_model))
    pairs = evaluator.heldout_pairs
    margins, nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for i in range(len(pairs)):
            prompt, chosen, rejected = (pairs.prompts[i], pairs.completions["chosen"][i],
                                        pairs.completions["rejected"][i])
            ratio = [_sum_logprobs64(policy, prompt, c) - _sum_logprobs64(initial, prompt, c)
                     for c in (chosen, rejected)]
            margins.append(ratio[0] - ratio[1])
            nll -= _sum_logprobs64(policy, prompt, chosen)
            tokens += int((chosen >= 0).sum())
        assert min(abs(m) for m in margins) > 1e-3  # no margin a rounding could flip
        wins = [1.0 if m > 0 else 0.0 for m in margins]
        assert row["preference_accuracy"] == sum(wins) / len(wins)
        assert row["preference_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
        assert row["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        # the policy's samples: drawn again on the evaluation's generator
        responses = sample(trainer, trainer.policy, evaluator.prompts, ("study", "eval", 0, 4))
        kls = [_sum_logprobs64(policy, p, r) - _sum_logprobs64(initial, p, r)
               for p, r in zip(evaluator.prompts, responses)]
    assert row["kl_to_init"] == pytest.approx(max(sum(kls) / len(kls), 0.0), rel=1e-4, abs=1e-6)
    lengths = [int((r >= 0).sum()) for r in responses]  # PAD (-100) after the first EOS
    assert row["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    eos = trainer.task.eos_id
    for r, n in zip(responses, lengths):
        assert (r[:n] == eos).sum() <= 1 and (n == r.shape[0] or r[n - 1] == eos)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("g", user_files["gold"]))
    module.__spec__.loader.exec_module(module)
    texts = [trainer.task.tokenizer.decode(r[r >= 0].tolist(), skip_special_tokens=True) for r in responses]
    gold = module.score(evaluator.raw_prompts, texts)
    initial_responses = sample(trainer, trainer.init_model, evaluator.prompts, ("study", "sft-responses"))
    sft = module.score(evaluator.raw_prompts, [trainer.task.tokenizer.decode(
        r[r >= 0].tolist(), skip_special_tokens=True) for r in initial_responses])
    assert row["gold_reward"] == pytest.approx(sum(gold) / len(gold))
    assert row["gold_gain"] == pytest.approx((sum(gold) - sum(sft)) / len(gold))
    assert row["gold_win_rate"] == pytest.approx(
        sum(1.0 if g > s else 0.5 if g == s else 0.0 for g, s in zip(gold, sft)) / len(gold))


def test_the_learning_rate_schedule_spans_the_whole_point_across_its_evaluations(user_files, tmp_path):
    """TRL's linear decay over the point's steps, though the point stops at each evaluation."""
    from pyalign.study.point import _trainer_and_evaluator
    from pyalign.trainers.resolve import resolve_config_values
    spec = _spec(user_files, seeds=[0], algos={"dpo": {"beta": [0.1]}}, preference={"lr": 0.01},
                 eval={"prompts": 2, "heldout": 2})
    (point, path), = prepare(parse_grid(spec), str(tmp_path / "study"))
    algo, run, config = resolve_config_values(load_config_file(path), path)
    assert config.lr_scheduler_type == "linear" and point.steps == 8
    trainer, _ = _trainer_and_evaluator(algo, run, config)
    first = trainer.train(2, progress=False, schedule_steps=point.steps)
    assert first["last_step"]["lr"] == pytest.approx(0.01 * 7 / 8)  # (8 - 2 + 1) / 8
    second = trainer.train(4, progress=False, schedule_steps=point.steps)
    assert second["last_step"]["lr"] == pytest.approx(0.01 * 5 / 8)
    alone = trainer.train(5, progress=False)  # a run of 5 steps: its last step at lr / 5
    assert alone["last_step"]["lr"] == pytest.approx(0.01 / 5)
