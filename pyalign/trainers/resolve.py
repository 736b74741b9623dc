"""A run's settings resolved from their sources and checked before any work, for ``pyalign
train`` and ``pyalign study`` (``resolve``; ``resolve_config_values`` for one config mapping).

Layers, later ones over earlier ones: the field defaults; the algorithm's values and the
defaults of the run one is doing (``fields.Algorithm``: the embedded task's tuned values, or
TRL 1.16's when ``model`` is set); the config file; the command line. A resume starts instead
from the settings stored in its checkpoint, and any setting given that differs from them is
refused with its key named (``RESUMABLE_CHANGES`` may change: steps, checkpointing, threads...).

Then what follows from the settings is derived: the embedded task's reward (``reward = "gold"``)
goes to RLConfig; TRL's batch spelling (``per_device_batch_size``,
``gradient_accumulation_steps``) becomes ``micro_batch_size`` and the global ``batch_size``;
``eval_data`` turns evaluation on (every 10 steps, TRL's ``logging_steps``); with ``data`` the
number of rows is ``num_examples`` (KTO on pairs: two rows per pair) and ``steps`` follows from
rows x ``num_epochs`` / ``batch_size`` unless given; ``max_length`` is capped at the model's
positions unless given; the input files are fingerprinted (``fingerprints``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from pyalign import losses
from pyalign._utils import pip_extra
from pyalign.trainers.checkpoint import changed_settings
from pyalign.trainers.fields import (
    Algorithm,
    applies_to,
    as_field_type,
    check_fields,
    check_value,
    condition_text,
    declared,
    field_default,
    field_types,
)
from pyalign.trainers.fingerprints import run_digests
from pyalign.trainers.presets import ALGOS, algorithms_for
from pyalign.trainers.rl import REWARDS
from pyalign.trainers.settings import TABLES, ConfigError, RunSettings, names_of, owner_types
from pyalign.trainers.tracking import check_trackers

TRL_EVAL_STEPS = 10  # TRL's eval_steps default (its logging_steps) once there is evaluation data
DATA_ONLY = ("eval_data", "reward", "max_length", "max_prompt_length")
TASK_REWARD = "_task_reward"  # RLConfig.reward, apart from the run's own "reward" while resolving


def resolve_config_values(values: dict, where: str) -> tuple[str, dict, Any]:
    """(algo, run settings, trainer config) of one config mapping (a parsed config file),
    resolved and checked as ``pyalign train --config`` does it."""
    return resolve([(where, values)])


def resolve(sources: list, *, stored: Optional[dict] = None) -> tuple[str, dict, Any]:
    """(algo, run settings as a dict, trainer config) from ``sources``, (where, mapping) pairs in
    increasing precedence; ``stored``: the settings of the checkpoint a resume continues
    (``checkpoint.read_settings`` and its ``path``). ConfigError for anything wrong; DataError
    for an unreadable --data."""
    algorithm = _algorithm(sources, stored)
    given, where_of = _given(sources, algorithm)
    where = sources[-1][0] if sources else "command line"
    fresh = stored is None
    own_model = bool(given.get("model") if fresh else stored["run"].get("model"))
    values = _base(algorithm, own_model, stored)
    values.update(given)
    if algorithm.family == "rl" and values["reward"] in REWARDS:  # the embedded task's reward
        values[TASK_REWARD], values["reward"] = values["reward"], None
    _batch_spelling(values, given, algorithm, where)
    if fresh and values["eval_data"]:
        _evaluation_on(values, given)
    _data_settings(values, given, algorithm, where)
    rows = _data_rows(values, given, algorithm, where_of)
    _steps(values, given, algorithm, rows, fresh, where)
    values["lora"] = _lora(values["lora"], where_of.get("lora", where))
    run, config = _build(values, algorithm, where, lambda config: _check_given(
        given, where_of, config, algorithm))
    try:
        check_trackers(run["report_to"])
    except ValueError as exc:
        raise ConfigError(f"{where_of.get('report_to', where)}: {exc}") from None
    _check_out(run["out"])
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if config.batch_size % world_size:  # under torchrun: known before any process group exists
        raise ConfigError(f"key 'batch_size' must be divisible by the number of ranks "
                          f"({world_size}), got {config.batch_size}")
    if values["data"] or values["model"]:
        run["fingerprints"] = run_digests(run)
    if stored is not None:
        _check_resume(stored, run, dataclasses.asdict(config))
    return algorithm.name, run, config


def _algorithm(sources: list, stored: Optional[dict]) -> Algorithm:
    named = [(where, values["algo"]) for where, values in sources if values.get("algo") is not None]
    for (first_where, first), (where, algo) in zip(named, named[1:]):
        if algo != first:
            raise ConfigError(f"algo {algo!r} ({where}) contradicts algo = {first!r} in {first_where}")
    algo = named[-1][1] if named else (stored or {}).get("algo")
    if algo is None:
        raise ConfigError(f"no algorithm: pass --algo or set algo in the config file "
                          f"(one of {', '.join(ALGOS)})")
    if algo not in ALGOS:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    return ALGOS[algo]


def _given(sources: list, algorithm: Algorithm) -> tuple[dict, dict]:
    """The settings the sources give, by field name, checked (type, bounds, choices), and the
    source each came from."""
    names = {**names_of(RunSettings), **names_of(algorithm.config_class)}
    types_ = owner_types(algorithm.config_class)
    given, where_of = {}, {}
    for where, values in sources:
        unknown, seen = [], {}
        for key, value in values.items():
            if key in TABLES:
                given[key] = _task_table(value, where) if key == "task" else _study_table(value, where)
                where_of[key] = where
                continue
            if key == "algo":
                continue
            name = names.get(key)
            if name is None:
                unknown.append(key)
                continue
            if name in algorithm.fixed:
                raise ConfigError(f"{where}: key {key!r} is set by --algo {algorithm.name} and "
                                  f"cannot be changed here")
            if name in seen:
                raise ConfigError(f"{where}: keys {seen[name]!r} and {key!r} are two names of one "
                                  f"setting; give one")
            allowed = algorithm.choices.get(name)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{where}: key {key!r} of --algo {algorithm.name} must be one of "
                                  f"{', '.join(map(repr, allowed))}, got {value!r}")
            expected, field = types_[name]
            if isinstance(value, str) and isinstance(field_default(field), list):
                value = [value]  # a list setting given one item
            ok, checked = as_field_type(value, expected)
            if not ok and value is None:
                raise ConfigError(f"{where}: key {key!r} has no value (expected {checked})")
            if not ok:
                raise ConfigError(f"{where}: key {key!r} must be {checked}, got {value!r}")
            try:
                check_value(f"key {key!r}", field, checked)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            seen[name] = key
            given[name], where_of[name] = checked, where
        if unknown:
            raise ConfigError(f"{where}: unknown config key(s) {', '.join(map(repr, sorted(unknown)))} "
                              f"for algo {algorithm.name}; valid keys: {', '.join(_valid_keys(algorithm))}")
    return given, where_of


def _valid_keys(algorithm: Algorithm) -> list[str]:
    config = algorithm.preset_config()
    fields = declared(algorithm.config_class)
    return sorted([*declared(RunSettings), *(name for name, field in fields.items()
                                             if name not in algorithm.fixed and applies_to(config, field))])


def _base(algorithm: Algorithm, own_model: bool, stored: Optional[dict]) -> dict:
    """Every setting's starting value: the defaults of the run one is doing, or the settings
    a resumed run stored."""
    values = {f.name: field_default(f) for f in dataclasses.fields(RunSettings)}
    config_defaults = {f.name: field_default(f) for f in dataclasses.fields(algorithm.config_class)}
    values[TASK_REWARD] = config_defaults.pop("reward", None)
    values.update(config_defaults)
    if stored is None:
        values.update(algorithm.run_defaults(own_model), out=os.path.join("runs", algorithm.name))
    else:
        stored_config = dict(stored["config"])
        values[TASK_REWARD] = stored_config.pop("reward", values[TASK_REWARD])
        values.update({k: v for k, v in stored["run"].items() if k in values})
        values.update({k: v for k, v in stored_config.items() if k in values})
    values.update(algorithm.fixed, algo=algorithm.name)
    return values


def _batch_spelling(values: dict, given: dict, algorithm: Algorithm, where: str) -> None:
    """TRL's per-device batch and gradient accumulation -> micro_batch_size and the global
    batch_size (RL: per_device_batch_size counts completions, samples_per_prompt per prompt)."""
    trl = [k for k in ("per_device_batch_size", "gradient_accumulation_steps") if k in given]
    ours = [k for k in ("batch_size", "micro_batch_size") if k in given]
    if trl and ours:
        raise ConfigError(f"{where}: {', '.join(trl)} and {', '.join(ours)} are two spellings of the "
                          f"batch; give one of them")
    per_device, accumulation = values["per_device_batch_size"], values["gradient_accumulation_steps"]
    values["per_device_batch_size"] = values["gradient_accumulation_steps"] = None
    if ours or (per_device is None and accumulation is None):
        return
    group = values["samples_per_prompt"] if algorithm.family == "rl" else 1
    per_device = per_device or values["micro_batch_size"] * group
    if per_device % group:
        raise ConfigError(f"{where}: key 'per_device_batch_size' counts completions, "
                          f"{values['samples_per_prompt']} per prompt (samples_per_prompt): it must "
                          f"be a multiple of that, got {per_device}")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    values["micro_batch_size"] = per_device // group
    values["batch_size"] = values["micro_batch_size"] * (accumulation or 1) * world_size


def _evaluation_on(values: dict, given: dict) -> None:
    """--eval-data turns evaluation on: every TRL_EVAL_STEPS steps and after the last one,
    unless those are given."""
    if "eval_every" not in given and not values["eval_every"]:
        values["eval_every"] = TRL_EVAL_STEPS
    if "final_eval_batch_size" not in given and not values["final_eval_batch_size"]:
        values["final_eval_batch_size"] = values["eval_batch_size"]


def _data_settings(values: dict, given: dict, algorithm: Algorithm, where: str) -> None:
    """The data keys fit together and fit the algorithm; without --data the TRL defaults of
    the data keys do not apply."""
    if not values["data"]:
        for key in DATA_ONLY:
            if given.get(key) is not None and values[key] is not None:
                raise ConfigError(f"key {key!r} needs --data (the user's dataset); the embedded "
                                  f"task has its own data and rewards")
            values[key] = None
        return
    if not values["model"]:
        raise ConfigError("--data needs --model DIR: the model (and its tokenizer) to train on it")
    if values["task"]:
        raise ConfigError("--data trains on the user's data: the [task] table is for the embedded "
                          "task")
    if algorithm.family == "rl":
        if not values["reward"]:
            raise ConfigError(f"--algo {algorithm.name} samples completions and needs --reward: "
                              f"path/to/file.py:function, module:function or a local reward-model "
                              f"directory")
        if values[TASK_REWARD] != "proxy":
            raise ConfigError(f"key 'reward' = {values[TASK_REWARD]!r} names a reward of the "
                              f"embedded task; with --data the reward is --reward")
    elif values["reward"]:
        raise ConfigError(f"--reward is for the RL algorithms; --algo {algorithm.name} learns from "
                          f"the preferences in --data")
    if "max_length" not in given and values["max_length"] is not None:
        positions = _model_positions(values["model"])
        if positions is not None:  # TRL's 1024, within what the model can hold
            values["max_length"] = min(values["max_length"], positions)


def _model_positions(model_dir: str) -> Optional[int]:
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - the model's loading names the problem
        return None
    return getattr(config, "max_position_embeddings", None)


def _data_rows(values: dict, given: dict, algorithm: Algorithm, where_of: dict) -> Optional[int]:
    """The number of examples of --data (None without it); a preference run's num_examples."""
    if not values["data"]:
        return None
    from pyalign.data import example_count, load_rows
    if algorithm.family == "rl":
        kind = "prompt"
    else:
        loss = values["loss"]
        kind = "unpaired" if isinstance(loss, str) and loss in losses.UNPAIRED_NAMES else "preference"
    rows = example_count(load_rows(values["data"]), kind)
    if algorithm.family == "preference":
        if "num_examples" in given:
            raise ConfigError(f"{where_of['num_examples']}: key 'num_examples' is the number of rows "
                              f"of --data; do not set it")
        values["num_examples"] = rows
        if rows < values["batch_size"]:
            raise ConfigError(f"{values['data']} has {rows} examples, fewer than batch_size "
                              f"{values['batch_size']}: set a smaller batch (per_device_batch_size, "
                              f"or batch_size)")
    return rows


def _steps(values: dict, given: dict, algorithm: Algorithm, rows: Optional[int], fresh: bool,
           where: str) -> None:
    """steps = examples x num_epochs / batch_size, unless steps is given (or stored)."""
    epochs = values["num_epochs"]
    if "steps" in given or epochs is None or not (fresh or "num_epochs" in given):
        return
    examples = values["num_examples"] if algorithm.family == "preference" else rows
    if examples is None:  # RL on the embedded task draws prompts without end: no epochs
        if "num_epochs" in given:
            raise ConfigError(f"{where}: key 'num_epochs' needs --data for --algo {algorithm.name} "
                              f"(the embedded task's prompts have no epoch); set steps")
        values["steps"] = values["steps"] or algorithm.tuned.get("steps")
        return
    values["steps"] = max(1, math.ceil(examples * epochs / values["batch_size"]))


def _lora(spec, where: str) -> Optional[dict]:
    """The ``lora`` key (``--lora r=16,alpha=32,...``) as the full spec dict of
    ``pyalign.integrations.lora.parse_lora_spec`` (what checkpoints store), or None."""
    if spec is None:
        return None
    import importlib.util

    from pyalign.integrations.lora import LoraSpecError, parse_lora_spec
    try:
        parsed = parse_lora_spec(spec)
    except LoraSpecError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if importlib.util.find_spec("peft") is None:  # checked here, before the task is built
        raise ConfigError(f"--lora needs peft: {pip_extra('lora')} (or pip install peft)")
    return parsed


def _build(values: dict, algorithm: Algorithm, where: str, check_given) -> tuple[dict, Any]:
    """(run settings, validated config); ``check_given`` sees the config before its validation
    (a given key that does not apply is named as such, not as a bad value)."""
    run_names = [f.name for f in dataclasses.fields(RunSettings)]
    config_names = [f.name for f in dataclasses.fields(algorithm.config_class)]
    run = {name: values[name] for name in run_names}
    config_values = {name: values[name] for name in config_names if name != "reward"}
    if "reward" in config_names:
        config_values["reward"] = values[TASK_REWARD]
    try:
        check_fields(RunSettings(**run))
        config = algorithm.config_class(**config_values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    check_given(config)
    try:
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return run, config


def _check_given(given: dict, where_of: dict, config, algorithm: Algorithm) -> None:
    """A given setting means something for this run; a preference loss is of the algorithm's
    kind (pairwise, or unpaired for KTO)."""
    fields = declared(type(config))
    for name in given:
        if name in fields and not applies_to(config, fields[name]):
            condition = condition_text(fields[name].metadata["applies"])
            raise ConfigError(f"{where_of[name]}: key {name!r} does not apply to algo "
                              f"{algorithm.name} (it is for "
                              f"{', '.join(algorithms_for(name, algorithm.family)) or 'none'}: it "
                              f"applies when {condition})")
    if algorithm.family != "preference" or "loss" not in given:
        return
    kind = algorithm.preset_config().loss_kind
    names = losses.UNPAIRED_NAMES if kind == "unpaired" else losses.PAIRWISE_NAMES
    chosen = config.loss
    if kind == "unpaired" and not isinstance(chosen, str):
        raise ConfigError(f"{where_of['loss']}: loss must be one unpaired loss ({', '.join(names)}), "
                          f"got the list {chosen!r}")
    for name in [chosen] if isinstance(chosen, str) else chosen:
        if name not in names:
            article = "an" if kind == "unpaired" else "a"
            raise ConfigError(f"{where_of['loss']}: loss {name!r} is not {article} {kind} loss "
                              f"({', '.join(names)})")


def _check_resume(stored: dict, run: dict, config: dict) -> None:
    """Every setting of the resumed run is the stored one (but RESUMABLE_CHANGES), its input
    files included (their fingerprints)."""
    path = stored["path"]
    saved_config = stored["config"]
    changes = [(k, saved_config.get(k), config.get(k)) for k in changed_settings(saved_config, config)]
    saved_run = {k: v for k, v in stored["run"].items() if k != "fingerprints"}
    current_run = {k: v for k, v in run.items() if k != "fingerprints"}
    changes += [(k, saved_run.get(k), current_run.get(k)) for k in changed_settings(saved_run, current_run)]
    if changes:
        listed = ", ".join(f"{k!r} ({new!r} here, {old!r} in the run)" for k, old, new in changes)
        raise ConfigError(f"--resume: the run's checkpoint {path} was written with other settings: "
                          f"key(s) {listed}; resume with the run's settings (leave those options "
                          f"out) or start a new run in another --out")
    before, now = stored["run"].get("fingerprints") or {}, run.get("fingerprints") or {}
    for key in sorted(set(before) & set(now)):
        if before[key] != now[key]:
            what = {"tokenizer": f"the tokenizer of {run['model']}", "model": f"the model {run['model']}",
                    "reward": f"--reward {run['reward']}"}.get(key, f"the content of {run.get(key)}")
            raise ConfigError(f"--resume: key {key!r}: {what} is not what the run trained on "
                              f"(sha256 {before[key][:12]}... in {path}, {now[key][:12]}... now); "
                              f"resume with the run's files, or start a new run in another --out")


def _task_table(values, where: str) -> dict:
    """The [task] table: fields of pyalign.tasks.TaskConfig (sizes of the embedded task)."""
    from pyalign.tasks import TaskConfig
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'task' must be a table of TaskConfig fields")
    types_by_key = field_types(TaskConfig)
    unknown = sorted(set(values) - set(types_by_key))
    if unknown:
        raise ConfigError(f"{where}: unknown [task] key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sorted(types_by_key))}")
    checked = {}
    for key, value in values.items():
        ok, result = as_field_type(value, types_by_key[key])
        if not ok:
            raise ConfigError(f"{where}: key 'task.{key}' must be {result}, got {value!r}")
        checked[key] = result
    try:
        TaskConfig(**checked).validate()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return checked


def _study_table(values, where: str) -> dict:
    """The [study] table of a pyalign study point (pyalign/study/point.py checks its keys)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'study' must be a table")
    return dict(values)


def _check_out(out) -> None:
    """--out must name a directory this process can create or write into; nothing is created
    here (the run lock creates it)."""
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"key 'out' must be a directory path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"key 'out' must be a directory, got {out!r}, which is a file")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"key 'out' must be a directory path, got {out!r}, which lies under "
                          f"the file {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"key 'out' must be a writable directory, got {out!r} "
                          f"({existing} is not writable)")


__all__ = ["resolve", "resolve_config_values", "TRL_EVAL_STEPS"]
