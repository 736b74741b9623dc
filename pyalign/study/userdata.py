"""A study on one's own model and data: ``pyalign study --model DIR --data FILE`` (or the same
keys in a grid file), the grid's algorithms x strength knob x seeds trained with ``pyalign
train``'s settings for one's own model (TRL 1.16's defaults; any setting in the grid's tables).

Grid keys (``USER_KEYS``): ``model`` and ``data`` as ``pyalign train`` takes them; ``reward``,
the RL algorithms' ``--reward``; ``gold_reward``, a reward-model directory or
``file.py:function`` / ``module:function`` that only evaluates (without it the study measures
the held-out preference accuracy, measures.py); ``eval_data``, the held-out data, else
``heldout_fraction`` of --data's rows (0.1), drawn by a fixed seed, are held out and the points
train on the others. ``parse_grid`` records the split in the grid (``data_split``: the data's
format, its rows, the training and held-out rows, the files' SHA-256); ``write_split`` writes the two parts as
OUT/data/train.jsonl and OUT/data/heldout.jsonl, which each point's config names as its
``data`` and ``eval_data``: a point is a plain ``pyalign train --config`` run.

A preset on one's own model (``from_preset``) keeps its algorithms, knob values, seeds and
epochs, not its settings tuned for the embedded task (batch, KL budgets); the knobs counted in
optimizer steps (``STEP_KNOBS``: TR-*'s update period, Elastic Reset's reset period) are
rescaled from the embedded task's epoch to the user's, so they cover the same fractions of the
run; ``quick`` runs one epoch.

``check_inputs`` makes every check that needs the files before any point runs: the model's
config and tokenizer load, every algorithm's data tokenize (a bad row named by its file and
line), the held-out data tokenize, and --reward and --gold-reward load and give a finite number
on the first held-out prompts.
"""
from __future__ import annotations

import functools
import json
import math
import os

import numpy as np

from pyalign.study.grid import GridError
from pyalign.trainers.presets import ALGOS

USER_KEYS = ("model", "data", "eval_data", "gold_reward", "reward", "heldout_fraction")
HELDOUT_FRACTION = 0.1
EMBEDDED_ONLY = ("sizes", "task", "task_seed", "epoch_prompts")
STEP_KNOBS = ("tr_tau", "er_reset_every")
PRESET_KEYS = ("seeds", "epochs", "algos")  # what a preset gives a study on one's own model
PRESET_EPOCHS = {"quick": [0.25, 0.5, 1.0]}  # a first look: one epoch
TRAIN_NAME, HELDOUT_NAME = "train.jsonl", "heldout.jsonl"


def is_user(spec: dict) -> bool:
    """Whether a grid trains one's own model (``model`` or ``data`` set)."""
    return bool(spec.get("model") or spec.get("data"))


def _load(path: str, flag: str):
    from pyalign.data import DataError, load_rows
    try:
        return load_rows(path)
    except DataError as exc:
        raise GridError(f"{flag} {exc}") from None


def check_user_keys(spec: dict) -> None:
    """The user keys of a grid fit together; ``data_split`` is filled in (reading --data and
    --eval-data) where the grid does not hold it yet."""
    for key in USER_KEYS[:-1]:
        if spec.get(key) is not None and (not isinstance(spec[key], str) or not spec[key].strip()):
            raise GridError(f"grid key {key!r} must be a path (or a file.py:function), got {spec[key]!r}")
    for key in ("model", "data", "eval_data", "gold_reward", "reward"):
        if spec.get(key):  # a point runs from its config anywhere that sees the files
            spec[key] = absolute(spec[key])
    if not spec.get("model") or not spec.get("data"):
        given, needed = ("model", "data") if spec.get("model") else ("data", "model")
        raise GridError(f"--{given} needs --{needed}: a study on one's own model trains the model "
                        f"DIR on the data FILE (pyalign study --model DIR --data FILE)")
    embedded = [k for k in EMBEDDED_ONLY if spec.get(k)]
    if embedded:
        raise GridError(f"grid key(s) {', '.join(map(repr, embedded))} are for the embedded task; a "
                        f"study with --model trains that model on --data")
    if spec.get("eval_data"):
        if "heldout_fraction" in spec:
            raise GridError("heldout_fraction splits --data when there is no --eval-data; give one "
                            "of them")
    else:
        fraction = spec.setdefault("heldout_fraction", HELDOUT_FRACTION)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise GridError(f"grid key 'heldout_fraction' must be a fraction in (0, 1), got {fraction!r}")
    algos = spec.get("algos") if isinstance(spec.get("algos"), dict) else {}
    if spec.get("reward") and algos and all(a in ALGOS and ALGOS[a].family != "rl" for a in algos):
        raise GridError(f"--reward is what the RL algorithms train on; this grid has none "
                        f"({', '.join(algos)}), whose points learn from the preferences in --data")
    if "data_split" not in spec:
        spec["data_split"] = data_split(spec)
    if not spec.get("gold_reward") and spec["data_split"]["heldout_format"] != "preference":
        where = spec.get("eval_data") or spec["data"]
        raise GridError(f"without --gold-reward the study measures the held-out preference accuracy, "
                        f"which needs preference pairs (prompt/chosen/rejected) in {where}; give "
                        f"--gold-reward, or {'--eval-data with pairs' if spec.get('eval_data') else 'pairs'}")


def absolute(spec: str) -> str:
    """A path, or the file of a ``file.py:function`` spec, made absolute (a ``module:function``
    is left as it is: it is imported from the working directory or the Python path)."""
    target, sep, function = spec.rpartition(":")
    if sep and target.endswith(".py") and not os.path.isdir(spec):
        return f"{os.path.abspath(target)}:{function}"
    return os.path.abspath(spec) if os.path.exists(spec) or os.sep in spec or not sep else spec


def data_split(spec: dict) -> dict:
    """The data's format and rows, the rows of the training and held-out parts, and the files'
    SHA-256 (a study resumed on other data is another grid)."""
    from pyalign.data.loading import detect_format
    from pyalign.trainers.fingerprints import content_digest
    rows = _load(spec["data"], "--data")
    found = detect_format(rows)
    if spec.get("eval_data"):
        heldout = _load(spec["eval_data"], "--eval-data")
        split = {"rows": len(rows), "train_rows": len(rows), "heldout_rows": len(heldout),
                 "heldout_format": detect_format(heldout)}
    else:
        count = max(1, round(spec["heldout_fraction"] * len(rows)))
        if count >= len(rows):
            raise GridError(f"--data {spec['data']} has {len(rows)} rows: too few to hold "
                            f"{spec['heldout_fraction']:g} of them out and train on the rest; give "
                            f"--eval-data or more rows")
        split = {"rows": len(rows), "train_rows": len(rows) - count, "heldout_rows": count,
                 "heldout_format": found}
    digests = {key: content_digest(spec[key]) for key in ("data", "eval_data") if spec.get(key)}
    return {"format": found, **split, "sha256": digests}


def heldout_rows(rows: int, count: int) -> list[int]:
    """The indices of the held-out rows: ``count`` of ``rows`` drawn by a fixed seed, sorted."""
    import torch

    from pyalign.trainers.seeding import make_generator
    order = torch.randperm(rows, generator=make_generator("study", "heldout-split"))
    return sorted(order[:count].tolist())


def point_files(spec: dict, out: str) -> dict:
    """A point's ``data`` and ``eval_data``: --data and --eval-data, or the two parts of the
    split under OUT/data."""
    if spec.get("eval_data"):
        return {"data": os.path.abspath(spec["data"]), "eval_data": os.path.abspath(spec["eval_data"])}
    folder = os.path.join(os.path.abspath(out), "data")
    return {"data": os.path.join(folder, TRAIN_NAME), "eval_data": os.path.join(folder, HELDOUT_NAME)}


def write_split(spec: dict, out: str) -> dict:
    """Write the training and held-out parts of --data under OUT/data (as JSONL rows, the
    records --data holds); the paths of ``point_files``."""
    from pyalign._utils import atomic_write
    files = point_files(spec, out)
    if spec.get("eval_data"):
        return files
    rows = _load(spec["data"], "--data")
    held = set(heldout_rows(len(rows), spec["data_split"]["heldout_rows"]))
    os.makedirs(os.path.dirname(files["data"]), exist_ok=True)
    for path, keep in ((files["data"], lambda i: i not in held), (files["eval_data"], held.__contains__)):
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for i, r in enumerate(rows.records) if keep(i)]
        atomic_write(path, "".join(lines))
    return files


@functools.lru_cache(maxsize=None)
def _resolved(key: str) -> tuple[int, bool]:
    """(batch size, whether the examples are unpaired) of the run settings ``key`` (JSON),
    resolved as ``pyalign train --model`` resolves them."""
    from pyalign.data import DataError
    from pyalign.trainers.resolve import resolve_config_values
    from pyalign.trainers.settings import ConfigError
    values = json.loads(key)
    try:
        _, _, config = resolve_config_values(values, where=f"[algos.{values['algo']}]")
    except (ConfigError, DataError) as exc:
        raise GridError(str(exc)) from None
    return config.batch_size, getattr(config, "loss_kind", None) == "unpaired"


def steps_per_epoch(algo: str, spec: dict, settings: dict) -> int:
    """Optimizer steps per pass over the training part (KTO on pairs: two examples a pair),
    with the batch ``pyalign train --model`` resolves from ``settings``."""
    family = ALGOS[algo].family
    key = json.dumps({"algo": algo, "model": spec["model"], "data": spec["data"], "steps": 1,
                      **({"reward": spec["reward"]} if family == "rl" and spec.get("reward") else {}),
                      **settings}, sort_keys=True)
    batch, unpaired = _resolved(key)
    split = spec["data_split"]
    examples = split["train_rows"] * (2 if unpaired and split["format"] == "preference" else 1)
    if examples < batch:
        raise GridError(f"{algo}: the training part of --data {spec['data']} holds {examples} examples, "
                        f"fewer than the batch ({batch}); set a smaller per_device_batch_size in the "
                        f"grid's [{family}] table, or give more rows")
    return max(1, math.ceil(examples / batch))


def from_preset(name: str, preset: dict, user: dict) -> dict:
    """The grid of the preset ``name`` on one's own model (``user``: the user keys): its
    algorithms, knob values, seeds and epochs (``quick``: one epoch), its step-counted knobs
    rescaled from the embedded task's epoch to the training part's."""
    from pyalign.study.grid import steps_per_epoch as embedded_steps_per_epoch
    if preset.get("sizes") or preset.get("task"):
        raise GridError(f"preset {name!r} studies the embedded task's length and model sizes; on one's "
                        f"own model use another preset or --grid FILE")
    spec = {**json.loads(json.dumps({k: preset[k] for k in PRESET_KEYS if k in preset})), **user}
    spec["epochs"] = PRESET_EPOCHS.get(name, spec.get("epochs"))
    check_user_keys(spec)
    embedded = {"epoch_prompts": preset.get("epoch_prompts", 1024)}
    for algo, knobs in spec["algos"].items():
        family = ALGOS[algo].family
        fixed = {k: v for k, v in knobs.items() if not isinstance(v, list)}
        theirs = embedded_steps_per_epoch(algo, embedded, {**preset.get(family, {}), **fixed})
        mine = steps_per_epoch(algo, spec, {k: v for k, v in fixed.items() if k not in STEP_KNOBS})
        for knob in set(STEP_KNOBS) & set(knobs):
            scaled = [max(1, round(v * mine / theirs)) for v in np.atleast_1d(knobs[knob]).tolist()]
            knobs[knob] = list(dict.fromkeys(scaled)) if isinstance(knobs[knob], list) else scaled[0]
    return spec




def check_embedded(spec: dict) -> None:
    """A grid without ``model`` and ``data`` sets none of the other user keys."""
    stray = [k for k in USER_KEYS if spec.get(k) is not None]
    if stray:
        raise GridError(f"{', '.join('--' + k.replace('_', '-') for k in stray)} need(s) --model DIR and "
                        f"--data FILE: a study of one's own model")


def check_inputs(grid) -> None:
    """Every check that needs the files, before any point runs (the module docstring); a
    GridError names the file, its line or row, or the reward."""
    from transformers.utils import logging as transformers_logging

    from pyalign.data import DataError
    from pyalign.data.rewards import RewardError
    from pyalign.study.grid import train_config
    from pyalign.trainers.build import build_data_task
    from pyalign.trainers.resolve import resolve_config_values
    from pyalign.trainers.settings import ConfigError
    transformers_logging.disable_progress_bar()  # a reward model's loading bar, amid the study's
    spec = grid.spec
    tokenizer, positions = _tokenizer(spec["model"])
    checked = set()
    try:
        for point in grid.points()[:: len(spec["seeds"])]:
            values = train_config(point, spec, out="unused")
            values.pop("study")
            _, run, config = resolve_config_values(values, where=f"grid point {point.point_id}")
            limits = json.dumps([point.algo, run["max_length"], run["max_prompt_length"],
                                 run["max_completion_length"], run["reward"]])
            if limits not in checked:  # tokenizes --data, --eval-data; loads and calls --reward
                checked.add(limits)
                task, _ = build_data_task(point.algo, run, config, tokenizer, positions)
                _check_heldout(spec, run, tokenizer, positions)
        if spec.get("gold_reward"):
            _check_gold(spec, task)
    except (ConfigError, DataError, RewardError) as exc:
        raise GridError(str(exc)) from None


def _tokenizer(model: str):
    """(tokenizer, positions) of the model directory, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer
    if not os.path.isdir(model):
        raise GridError(f"--model {model}: not a directory (a local Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the message says which
        raise GridError(f"--model {model}: cannot load its config and tokenizer: {exc}") from None
    return tokenizer, getattr(config, "max_position_embeddings", None)


def _check_heldout(spec: dict, run: dict, tokenizer, positions) -> None:
    """Without a gold reward, the held-out pairs tokenize as the training data do."""
    from pyalign.data import load_rows, tokenize_rows
    if spec.get("gold_reward"):
        return
    tokenize_rows(load_rows(spec.get("eval_data") or spec["data"]), tokenizer, kind="preference",
                  max_length=run["max_length"], max_prompt_length=run["max_prompt_length"],
                  max_positions=positions)


def _check_gold(spec: dict, task) -> None:
    """--gold-reward loads and gives a finite number for the first held-out prompts, each with a
    one-token completion (EOS)."""
    import torch

    from pyalign.data import load_rows, tokenize_rows
    from pyalign.data.rewards import RewardError, load_reward
    gold = load_reward(spec["gold_reward"], conversational=task.conversational, flag="--gold-reward")
    rows = load_rows(spec.get("eval_data") or spec["data"])
    first = type(rows)(rows.path, rows.records[:2], rows.unit, rows.numbers[:2])
    prompts = tokenize_rows(first, task.tokenizer, kind="prompt")
    token = task.eos_id if task.eos_id is not None else task.bos_id
    _, texts = task.decode(prompts.prompts, torch.full((len(prompts), 1), token, dtype=torch.long))
    try:
        values = gold(prompts.raw_prompts, texts)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"--gold-reward {spec['gold_reward']} failed on the first prompts of "
                          f"{rows.path}: {type(exc).__name__}: {exc}") from exc
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RewardError(f"--gold-reward {spec['gold_reward']} returned {bad[0]} on the first prompts of "
                          f"{rows.path}; a gold reward must be a finite number for every completion")


__all__ = ["USER_KEYS", "is_user", "check_user_keys", "check_embedded", "check_inputs", "data_split",
           "heldout_rows", "point_files", "write_split", "steps_per_epoch", "from_preset"]
