"""`pyalign train`: preference and RL training on the embedded task, or on a local HF model and data.

    pyalign train --algo tr-dpo --steps 100 --out runs/tr-dpo
    pyalign train --algo elastic-reset --config er.toml --resume
    torchrun --nproc-per-node 2 -m pyalign.cli train --algo dpo      # DDP (gloo on CPU)
    pyalign train --algo tr-dpo --model DIR --data prefs.jsonl        # your model and data

With --data (pyalign.data) the run trains the --model causal LM on the file's rows in TRL's
dataset formats (preference, unpaired for KTO, prompt-only with --reward for RL) instead of the
embedded task; the data keys (data, eval_data, reward, max_length, max_prompt_length,
max_completion_length) are run keys too.

A config file (TOML, or YAML when pyyaml is installed) holds flat ``key = value`` pairs: the run
keys (algo, steps, seed, out, model, lora, backend, bf16, fsdp, threads, task_seed,
task_cache_dir, and the data keys above), the trainer keys of the algorithm (``--print-config``
lists them with their defaults), an optional ``[task]`` table of pyalign.tasks.TaskConfig sizes
and, in the configs `pyalign study` writes, a ``[study]`` table (the run is then a study point:
pyalign/study/point.py evaluates it at the table's steps into OUT/evals.jsonl). Command-line
flags override the file.
``lora = "r=16,alpha=32"`` (``--lora``) trains a peft LoRA adapter on the frozen model; TR-DPO
then lerps the reference's adapter weights (a frozen copy of base + adapter).
Writes metrics.jsonl, reward_vs_kl.png and checkpoints/ under --out and prints a summary line;
each checkpoint stores these run settings (under "run"), and ``pyalign export OUT --out DIR``
writes the trained policy as a transformers model (pyalign/cli/export.py).
Checkpoints are periodic (checkpoint_every = 50 steps, checkpoint_minutes = 10.0; 0 disables
either), so a killed run continues with --resume from its newest complete checkpoint; a run
killed before its first one restarts from scratch under --resume (with a notice). --out holds one
run at a time: OUT/.lock names the live holder; a dead holder's lock is taken over (a notice) and
atomic-write leftovers (.NAME.*.tmp) are removed at start. Every key is checked before any work.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import typing
from typing import Any, Optional

from pyalign._utils import toml_value
from pyalign.backends import CHOICES as BACKEND_CHOICES
from pyalign.trainers.presets import (
    ALGO_KEYS,
    ALGOS,
    DEFAULT_STEPS,
    LOSS_CONFIGURABLE,
    ONLY_FOR,
    TUNED_DEFAULTS,
)

# Settings of the run itself (not of the trainer's algorithm), with their types.
RUN_KEYS = {"algo": str, "steps": int, "seed": int, "out": str, "model": str, "backend": str,
            "bf16": bool, "fsdp": bool, "task_seed": int, "task_cache_dir": str, "threads": int,
            "lora": str}
# Run keys of training on the user's model and data (pyalign.data), with their defaults.
DATA_RUN_KEYS = {"data": str, "eval_data": str, "reward": str, "max_length": int,
                 "max_prompt_length": int, "max_completion_length": int}
DATA_DEFAULTS = {"data": None, "eval_data": None, "reward": None, "max_length": None,
                 "max_prompt_length": None, "max_completion_length": 64}
RUN_KEYS.update(DATA_RUN_KEYS)
# Below this many parameters a CPU run uses one intra-op thread unless told otherwise: the
# matrices are too small to split, and threads contending for busy cores cost several-fold.
SMALL_MODEL_PARAMS = 5_000_000


class ConfigError(ValueError):
    """A bad command line or config file."""


def _config_class(family: str):
    from pyalign.trainers import PreferenceConfig, RLConfig
    return PreferenceConfig if family == "preference" else RLConfig


def _field_types(config_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _check_type(key: str, value, expected, where: str):
    """Return ``value`` as ``expected`` (the trainers' ``as_field_type`` rule), or raise
    ConfigError naming the key and the file or command line it came from."""
    from pyalign.trainers.trainer import as_field_type
    ok, result = as_field_type(value, expected)
    if ok:
        return result
    if value is None:
        raise ConfigError(f"{where}: key {key!r} has no value (expected {result})")
    raise ConfigError(f"{where}: key {key!r} must be {result}, got {value!r}")


def load_config_file(path: str) -> dict:
    """Flat mapping of a TOML (or YAML) config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as handle:
        raw = handle.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: YAML configs need pyyaml (pip install pyyaml), or use TOML") from exc
        try:
            data = yaml.safe_load(raw.decode()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected key = value pairs at the top level")
    nested = [k for k, v in data.items() if isinstance(v, dict) and k not in ("task", "study")]
    if nested:
        raise ConfigError(f"{path}: the only tables are [task] and [study]; {nested} must be flat "
                          f"key = value pairs")
    return data


def _task_overrides(values, where: str) -> dict:
    """The [task] table: fields of pyalign.tasks.TaskConfig (sizes of the embedded task)."""
    from pyalign.tasks import TaskConfig
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'task' must be a table of TaskConfig fields")
    types_by_key = _field_types(TaskConfig)
    unknown = sorted(set(values) - set(types_by_key))
    if unknown:
        raise ConfigError(f"{where}: unknown [task] key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sorted(types_by_key))}")
    checked = {k: _check_type(f"task.{k}", v, types_by_key[k], where) for k, v in values.items()}
    try:
        TaskConfig(**checked).validate()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return checked


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


def resolve_settings(args: argparse.Namespace) -> tuple[str, dict, Any]:
    """(algo, run settings, trainer config) from defaults < config file < command line."""
    file_values = load_config_file(args.config) if args.config else {}
    return _resolve(file_values, args.config or "command line", args)


def resolve_config_values(values: dict, where: str) -> tuple[str, dict, Any]:
    """(algo, run settings, trainer config) of a config mapping (a parsed config file), resolved
    and checked exactly as ``pyalign train --config`` does it (pyalign.study checks its points
    with it before any run)."""
    return _resolve(values, where, argparse.Namespace(algo=None, config=None))


def _resolve(file_values: dict, where: str, args: argparse.Namespace) -> tuple[str, dict, Any]:
    algo = args.algo or file_values.get("algo")
    if algo is None:
        raise ConfigError(f"no algorithm: pass --algo or set algo in the config file "
                          f"(one of {', '.join(ALGOS)})")
    if algo not in ALGOS:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    if args.algo and file_values.get("algo") not in (None, args.algo):
        raise ConfigError(f"--algo {args.algo} contradicts algo = {file_values['algo']!r} in {args.config}")
    family, preset = ALGOS[algo]
    config_cls = _config_class(family)
    types_by_key = _field_types(config_cls)

    run = {"algo": algo, "steps": DEFAULT_STEPS[family], "seed": 0, "out": os.path.join("runs", algo),
           "model": None, "backend": "auto", "bf16": False, "fsdp": False, "task_seed": 0,
           "task_cache_dir": None, "task": {}, "threads": None, "lora": None, **DATA_DEFAULTS}
    trainer_values = dict(TUNED_DEFAULTS.get(algo, {}))
    unknown = []
    for key, value in file_values.items():
        if key == "task":
            run["task"] = _task_overrides(value, where)
        elif key == "study":  # a point of `pyalign study` (its evaluations; pyalign/study/point.py)
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'study' must be a table")
            run["study"] = dict(value)
        elif key in RUN_KEYS:
            run[key] = _check_type(key, value, RUN_KEYS[key], where)
        elif key in ALGO_KEYS and not (key == "loss" and algo in LOSS_CONFIGURABLE):
            raise ConfigError(f"{where}: key {key!r} is set by --algo {algo} and cannot be changed here")
        elif key in types_by_key and key not in ("seed", "bf16", "backend", "fsdp"):
            if key in ONLY_FOR and algo not in ONLY_FOR[key]:
                raise ConfigError(f"{where}: key {key!r} does not apply to algo {algo} "
                                  f"(it is for {', '.join(ONLY_FOR[key])})")
            trainer_values[key] = _check_type(key, value, types_by_key[key], where)
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(set(RUN_KEYS) | {k for k in types_by_key if k not in ALGO_KEYS
                                        and (k not in ONLY_FOR or algo in ONLY_FOR[k])})
        raise ConfigError(f"{where}: unknown config key(s) {', '.join(map(repr, sorted(unknown)))} "
                          f"for algo {algo}; valid keys: {', '.join(valid)}")
    for key in ("steps", "seed", "out", "model", "backend", "task_seed", "task_cache_dir", "threads",
                "lora", *DATA_RUN_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            run[key] = value
    for flag in ("bf16", "fsdp"):
        if getattr(args, flag, False):
            run[flag] = True
    # "reward" is two keys: a reward of the embedded task ("proxy", "gold": the RL trainer's
    # key) or the user's reward for --data (a model directory or module:function)
    from pyalign.trainers.rl import REWARDS  # the embedded task's
    if "reward" in types_by_key and run["reward"] in REWARDS:
        trainer_values["reward"], run["reward"] = run["reward"], None
    if "loss" in trainer_values:
        from pyalign.losses import PAIRWISE_NAMES, UNPAIRED_NAMES  # the loss registry
        kind, names = (("an unpaired", UNPAIRED_NAMES) if preset["loss"] in UNPAIRED_NAMES
                       else ("a pairwise", PAIRWISE_NAMES))
        chosen = trainer_values["loss"]
        if kind == "an unpaired" and not isinstance(chosen, str):
            raise ConfigError(f"{where}: loss must be one unpaired loss ({', '.join(names)}), "
                              f"got the list {chosen!r}")
        for name in [chosen] if isinstance(chosen, str) else chosen:
            if name not in names:
                raise ConfigError(f"{where}: loss {name!r} is not {kind} loss "
                                  f"({', '.join(names)})")
    values = {**preset, **trainer_values, "seed": run["seed"], "bf16": run["bf16"],
              "backend": run["backend"], "fsdp": run["fsdp"]}
    if getattr(args, "no_progress", False):
        values["progress"] = False
    for key, minimum in (("threads", 1), ("steps", 1), ("seed", 0), ("task_seed", 0)):
        value = run[key]
        if value is None and key == "threads":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"key {key!r} must be an int >= {minimum}, got {value!r}")
    _check_out(run["out"])
    run["lora"] = _resolve_lora(run["lora"], where)
    _check_data_settings(algo, family, run, trainer_values)
    try:
        config = config_cls(**values)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    # Under torchrun the world size is known before any process group exists: a global batch
    # that does not split over the ranks is a config error, not a failure at the first step.
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if config.batch_size % world_size:
        raise ConfigError(f"key 'batch_size' must be divisible by the number of ranks "
                          f"({world_size}), got {config.batch_size}")
    return algo, run, config


def config_line(key: str, value) -> str:
    """One resolved setting as a config-file line: TOML that load_config_file reads back to the
    same value (an unset key, None, commented out: TOML has no null); ``lora`` as its spec text."""
    if value is None:
        return f"# {key} =   (not set)"
    if key == "lora":
        from pyalign.integrations.lora import format_lora_spec
        value = format_lora_spec(value)
    return f"{key} = {toml_value(value)}"


def _resolve_lora(spec, where: str) -> Optional[dict]:
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
        raise ConfigError("--lora needs peft: pip install 'pyalign[lora]' (or pip install peft)")
    return parsed


def lora_factory(base_factory, spec: dict):
    """A model factory giving copies of ONE LoRA-wrapped model (``apply_lora``): built on the
    first call (the trainer seeds the adapter's random init before it), copied after, so the
    policy, the initial model and a trust-region reference start with the same adapter. Only the
    adapter trains; the copies' frozen base weights are equal and stay so."""
    from pyalign.integrations.lora import apply_lora
    built = []

    def factory():
        if not built:
            try:
                built.append(apply_lora(base_factory(), spec))
            except ValueError as exc:  # peft: e.g. a target module the model does not have
                raise ConfigError(f"--lora {spec}: peft cannot wrap the model: {exc}") from exc
        return copy.deepcopy(built[0])
    return factory


def _load_causal_lm(model_dir: str):
    """(model in fp32, its vocabulary size) of a local Hugging Face causal-LM directory."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model {model_dir}: not a directory (a local Hugging Face model directory)")
    try:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"--model {model_dir}: cannot load a causal LM from it: {exc}") from exc
    head = model.get_output_embeddings()
    return model.float(), head.weight.shape[0] if head is not None else model.config.vocab_size


def load_hf_model(model_dir: str, task):
    """A local Hugging Face causal LM whose vocabulary covers the task's token ids."""
    model, vocab = _load_causal_lm(model_dir)
    if vocab != task.vocab_size:
        raise ConfigError(f"--model {model_dir}: its vocabulary has {vocab} tokens but the task uses "
                          f"{task.vocab_size}; the model's vocabulary must be the task's")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and max_positions < task.prompt_len + task.response_len:
        raise ConfigError(f"--model {model_dir}: max_position_embeddings {max_positions} < the task's "
                          f"prompt_len + response_len = {task.prompt_len + task.response_len}")
    return model


def _check_data_settings(algo: str, family: str, run: dict, trainer_values: dict) -> None:
    """The --data/--reward/--max-*length keys fit together and fit the algorithm (the data
    itself is checked when it is loaded, before any training)."""
    for key in ("max_length", "max_prompt_length", "max_completion_length"):
        value = run[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"key {key!r} must be an int >= 1, got {value!r}")
    if not run["data"]:
        for key in ("eval_data", "reward", "max_length", "max_prompt_length"):
            if run[key] is not None:
                raise ConfigError(f"key {key!r} needs --data (the user's dataset); the embedded "
                                  f"task has its own data and rewards")
        return
    if not run["model"]:
        raise ConfigError("--data needs --model DIR: the model (and its tokenizer) to train on it")
    if run.get("study") or run.get("task"):
        raise ConfigError("--data trains on the user's data: the [task] and [study] tables are for "
                          "the embedded task")
    if family == "rl":
        if not run["reward"]:
            raise ConfigError(f"--algo {algo} samples completions and needs --reward: a local "
                              f"reward-model directory or module:function")
        if trainer_values.get("reward", "proxy") != "proxy":
            raise ConfigError(f"key 'reward' = {trainer_values['reward']!r} names a reward of the "
                              f"embedded task; with --data the reward is --reward")
    elif run["reward"]:
        raise ConfigError(f"--reward is for the RL algorithms; --algo {algo} learns from the "
                          f"preferences in --data")
    if "num_examples" in trainer_values:
        raise ConfigError("key 'num_examples' is the number of rows of --data; do not set it")


def load_user_model(model_dir: str):
    """(model, tokenizer) of a local Hugging Face causal-LM directory, for --data."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model {model_dir}: not a directory (a local Hugging Face model directory)")
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"--model {model_dir}: no tokenizer could be loaded from it (--data needs "
                          f"the model's tokenizer saved beside it: tokenizer.save_pretrained): {exc}"
                          ) from exc
    model, vocab = _load_causal_lm(model_dir)
    if vocab < len(tokenizer):
        raise ConfigError(f"--model {model_dir}: its vocabulary has {vocab} tokens, fewer than its "
                          f"tokenizer's {len(tokenizer)}")
    return model, tokenizer


def build_data_task(algo: str, run: dict, config, tokenizer, max_positions: Optional[int]):
    """The DatasetTask of --data (and --eval-data, --reward), and the trainer config with
    num_examples = the number of rows; DataError/RewardError for bad data, before training."""
    from pyalign.data import DatasetTask, load_rows, tokenize_rows
    from pyalign.data.rewards import load_reward
    family = ALGOS[algo][0]
    if family == "rl":
        kind = "prompt"
    else:
        from pyalign.losses import UNPAIRED_NAMES
        kind = "unpaired" if config.loss in UNPAIRED_NAMES else "preference"
    limits = dict(max_length=run["max_length"], max_prompt_length=run["max_prompt_length"],
                  max_positions=max_positions,
                  generation_length=run["max_completion_length"] if kind == "prompt" else 0)
    if max_positions is not None and run["max_length"] is not None and run["max_length"] > max_positions:
        raise ConfigError(f"key 'max_length' is {run['max_length']}, more than the model's "
                          f"{max_positions} positions")
    train = tokenize_rows(load_rows(run["data"]), tokenizer, kind=kind, **limits)
    evaluation = None
    if run["eval_data"]:  # prompts for the evaluations (samples, KL, reward)
        evaluation = tokenize_rows(load_rows(run["eval_data"]), tokenizer, kind="prompt",
                                   **{**limits, "generation_length": run["max_completion_length"]})
    generation = run["max_completion_length"]
    if max_positions is not None:  # room after the longest prompt
        longest = max(d.prompts.shape[1] for d in filter(None, (train, evaluation)))
        generation = max(1, min(generation, max_positions - longest))
    reward = load_reward(run["reward"], conversational=train.conversational) if run["reward"] else None
    task = DatasetTask(tokenizer, train, eval_data=evaluation, max_completion_length=generation,
                       reward=reward)
    if reward is not None:  # one call before training: a reward that cannot score fails here
        task.check_reward()
    if family == "preference":
        if len(train) < config.batch_size:
            raise ConfigError(f"{run['data']} has {len(train)} rows, fewer than batch_size "
                              f"{config.batch_size}")
        config = dataclasses.replace(config, num_examples=len(train))
        config.validate()
    return task, config


def build_trainer(algo: str, run: dict, config, *, dist_ctx=None, progress: bool = True):
    """The task, the model factory and the trainer of a resolved configuration."""
    import pyalign.tasks
    from pyalign.trainers import PreferenceTrainer, RLTrainer
    from pyalign.trainers.distributed import init_distributed

    dist_ctx = dist_ctx or init_distributed()
    family = ALGOS[algo][0]
    cls = PreferenceTrainer if family == "preference" else RLTrainer
    if run.get("data"):  # the user's model and data (pyalign.data)
        base, tokenizer = load_user_model(run["model"])
        max_positions = getattr(base.config, "max_position_embeddings", None)
        task, config = build_data_task(algo, run, config, tokenizer, max_positions)
        factory = lambda: copy.deepcopy(base)  # noqa: E731
        if run.get("lora"):
            factory = lora_factory(factory, run["lora"])
        return cls(task, config, algo=algo, out_dir=run["out"], model_factory=factory,
                   dist_ctx=dist_ctx, run_settings=run)
    # rank 0 builds (and caches) the task first; the others then load it from the cache
    if not dist_ctx.is_main:
        dist_ctx.barrier()
    task_config = pyalign.tasks.TaskConfig(**run["task"]) if run.get("task") else None
    task = pyalign.tasks.make_task(run["task_seed"], cache_dir=run["task_cache_dir"],
                                   progress=progress and dist_ctx.is_main, config=task_config)
    if dist_ctx.is_main:
        dist_ctx.barrier()
    factory = None
    if run["model"]:
        base = load_hf_model(run["model"], task)
        factory = lambda: copy.deepcopy(base)  # noqa: E731
    if run.get("lora"):
        factory = lora_factory(factory or task.new_policy, run["lora"])
    return cls(task, config, algo=algo, out_dir=run["out"], model_factory=factory, dist_ctx=dist_ctx,
               run_settings=run)


def _prepare_out_dir(run: dict, resume, overwrite: bool, is_main: bool) -> None:
    from pyalign.trainers.checkpoint import list_checkpoints
    out = run["out"]
    checkpoints = list_checkpoints(os.path.join(out, "checkpoints"))
    if resume or not checkpoints:
        return
    if not overwrite:
        raise ConfigError(f"{out} already holds checkpoints of an earlier run ({checkpoints[-1][1]}); "
                          f"pass --resume to continue it, --overwrite to start again, or another --out")
    if is_main:
        for _, path in checkpoints:
            os.remove(path)


def _resume_decision(out: str, resume) -> tuple[Optional[str], Optional[str]]:
    """(what to resume, a notice). ``--resume`` into a directory where a run started but was
    killed before its first complete checkpoint (its lock, metrics or checkpoint folder are
    there) starts from scratch, with a notice; into a directory with no trace of a run it is an
    error (most likely a wrong --out)."""
    from pyalign.trainers.checkpoint import CheckpointError, list_checkpoints
    from pyalign.trainers.lock import LOCK_NAME
    if resume not in ("", "latest"):
        return resume, None
    checkpoints = os.path.join(out, "checkpoints")
    if list_checkpoints(checkpoints):
        return resume, None
    traces = [name for name in (LOCK_NAME, "metrics.jsonl", "checkpoints")
              if os.path.exists(os.path.join(out, name))]
    if not traces:
        raise CheckpointError(f"--resume: no checkpoint (step-NNNNNN.pt) in {checkpoints}, and no "
                              f"run was started in {out}")
    return None, (f"pyalign train: notice: --resume: no complete checkpoint in {checkpoints} (the "
                  f"run there stopped before its first one); starting from scratch")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from pyalign.data import DataError
    from pyalign.data.rewards import RewardError
    from pyalign.trainers.checkpoint import CheckpointError
    from pyalign.trainers.distributed import init_distributed
    from pyalign.trainers.metrics import format_summary
    try:
        algo, run, config = resolve_settings(args)
    except ConfigError as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    if run.get("study"):  # a `pyalign study` point: trained and evaluated by pyalign.study
        from pyalign.study.point import run_point
        return run_point(algo, run, config)
    if getattr(args, "print_config", False):
        print(f"# pyalign train --algo {algo}: the keys a config file may set, resolved (TOML: "
              f"save it and pass --config FILE)")
        settings = {**run, **dataclasses.asdict(config)}
        if run["reward"]:  # the user's reward (--data), not the embedded task's
            settings["reward"] = run["reward"]
        for key, value in settings.items():
            if key in ALGO_KEYS or key == "progress" or (key in ONLY_FOR and algo not in ONLY_FOR[key]):
                continue
            print(config_line(key, value))
        return 0
    from pyalign.trainers.lock import LockHeld, RunLock, remove_stale_temporaries
    dist_ctx = init_distributed()
    lock = None
    try:  # the backend reaches the ops through the trainer config (``config.backend``)
        resume, notice = _resume_decision(run["out"], args.resume)
        dist_ctx.barrier()  # every rank has looked at --out before rank 0 locks it
        failure = None
        if dist_ctx.is_main:  # one lock per run: rank 0 takes it for all ranks
            try:
                lock = RunLock(run["out"]).acquire()
            except LockHeld as exc:
                failure = str(exc)
            except OSError as exc:
                failure = f"key 'out' must be a writable directory, got {run['out']!r}: {exc}"
        if float(dist_ctx.all_reduce_sum(torch.tensor([1.0 if failure else 0.0], device=dist_ctx.device))[0]):
            raise ConfigError(failure or f"rank 0 could not lock {run['out']}")
        if dist_ctx.is_main:
            remove_stale_temporaries(run["out"], os.path.join(run["out"], "checkpoints"))
            if notice:
                print(notice, file=sys.stderr, flush=True)
        _prepare_out_dir(run, resume, getattr(args, "overwrite", False), dist_ctx.is_main)
        on_cpu = dist_ctx.device.type == "cpu"
        if run["threads"]:
            torch.set_num_threads(run["threads"])
        elif on_cpu and not run["model"]:  # the embedded task's model is tiny
            torch.set_num_threads(1)
        trainer = build_trainer(algo, run, config, dist_ctx=dist_ctx, progress=config.progress)
        if not run["threads"] and on_cpu and \
                sum(p.numel() for p in trainer.policy.parameters()) < SMALL_MODEL_PARAMS:
            torch.set_num_threads(1)
        summary = trainer.train(run["steps"], resume=resume)
    except (ConfigError, CheckpointError, DataError, RewardError) as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
        dist_ctx.close()
    if dist_ctx.is_main:
        if summary.get("metrics") and not summary.get("plot"):
            why = ("no evaluation during training (eval_every = 0): the plot needs at least one "
                   "besides the final one" if "gold_reward" in summary or "proxy_reward" in summary
                   else "this run has no gold or proxy reward (user data without --reward)")
            print(f"pyalign train: note: no reward_vs_kl.png: {why}", file=sys.stderr, flush=True)
        print(format_summary(summary), flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``train`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser("train", help="train on the embedded task (DPO, IPO, SLiC, KTO, "
                                   "TR-*, RLOO, Elastic Reset)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", choices=list(ALGOS), help="training algorithm")
    parser.add_argument("--config", help="TOML (or YAML) file of key = value settings")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: preference "
                        f"{DEFAULT_STEPS['preference']}, RL {DEFAULT_STEPS['rl']})")
    parser.add_argument("--out", help="output directory (default: runs/<algo>)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or from the newest one under --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds checkpoints (deletes them)")
    parser.add_argument("--seed", type=int, help="training seed (default 0)")
    parser.add_argument("--model", help="a local Hugging Face causal-LM directory to train instead "
                        "of the task's SFT model (with --data: any causal LM and its tokenizer; "
                        "without: its vocabulary must be the task's)")
    add_data_arguments(parser)
    parser.add_argument("--lora", metavar="SPEC", help="train a LoRA adapter (peft) instead of the "
                        "whole model, e.g. r=16,alpha=32,dropout=0.05,target_modules=q_proj+v_proj "
                        "(pyalign/integrations/lora.py lists the keys)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES,
                        help="pyalign op backend (default auto)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the model forwards")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    parser.add_argument("--task-seed", type=int, dest="task_seed",
                        help="seed of the embedded task (default 0)")
    parser.add_argument("--task-cache-dir", dest="task_cache_dir", help="where the embedded task is cached")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: 1 for models "
                        f"under {SMALL_MODEL_PARAMS // 1_000_000}M parameters on CPU, else torch's)")
    parser.add_argument("--no-progress", action="store_true", dest="no_progress", help="no tqdm bar")
    parser.add_argument("--print-config", action="store_true", dest="print_config",
                        help="print the resolved settings and exit")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Training on the user's data (pyalign.data), in TRL's dataset formats."""
    parser.add_argument("--data", help="JSONL/JSON/Parquet file or datasets directory: preference "
                        "prompt/chosen/rejected (or chosen/rejected), unpaired prompt/completion/label "
                        "(KTO), prompt-only (RL); standard or conversational; needs --model")
    parser.add_argument("--eval-data", dest="eval_data", help="a dataset whose prompts the "
                        "evaluations sample on (default: --data's)")
    parser.add_argument("--reward", help="RL with --data: a local sequence-classification reward-model "
                        "directory, or module:function taking (prompts, completions) -> list of floats")
    parser.add_argument("--max-length", type=int, dest="max_length",
                        help="truncate prompt + completion to this many tokens (completion from the right)")
    parser.add_argument("--max-prompt-length", type=int, dest="max_prompt_length",
                        help="truncate prompts to this many tokens (from the left)")
    parser.add_argument("--max-completion-length", type=int, dest="max_completion_length",
                        help=f"tokens sampled per completion with --data "
                        f"(default {DATA_DEFAULTS['max_completion_length']})")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pyalign.cli.train ...``: the same as ``pyalign train ...``."""
    parser = argparse.ArgumentParser(prog="pyalign train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
