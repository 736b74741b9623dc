"""The settings of a ``pyalign train`` run, declared once: ``RunSettings`` (the run's own: model,
data, output, logging) and the algorithm's config class (``TrainerConfig`` and its family's
subclass), every field made with ``fields.setting``; the config file; and the errors of both.
``pyalign/trainers/resolve.py`` resolves a run's settings from them, for ``pyalign train`` and
``pyalign study`` alike.

A config file (TOML, or YAML when pyyaml is installed) holds flat ``key = value`` pairs: any
setting of the run or of the algorithm's config, by its name or one of its aliases (TRL's names:
``learning_rate``, ``max_steps``, ``num_generations``...), an optional ``[task]`` table of
``pyalign.tasks.TaskConfig`` sizes and, in the configs ``pyalign study`` writes, a ``[study]``
table (the run is then a study point, pyalign/study/point.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from pyalign._utils import toml_value
from pyalign.trainers.fields import declared, field_types, setting
from pyalign.trainers.presets import ALGOS

TABLES = ("task", "study")
REPORT_TO = ("none", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A bad command line or config file."""


@dataclasses.dataclass
class RunSettings:
    """The run's own settings (the trainer's are its config class). Stored in every checkpoint
    (``run``): a run directory describes itself, and ``--resume`` continues with them."""

    algo: Optional[str] = setting(None, "the training algorithm", choices=tuple(ALGOS))
    out: Optional[str] = setting(None, "the output directory (default runs/<algo>)",
                                 aliases=("output_dir",))
    model: Optional[str] = setting(None, "a local Hugging Face causal-LM directory to train (with "
                                   "--data: any causal LM and its tokenizer; without: the "
                                   "embedded task's vocabulary); the defaults become TRL's")
    lora: Union[str, dict, None] = setting(None, "train a LoRA adapter (peft) instead of the whole "
                                           "model, e.g. r=16,alpha=32,dropout=0.05,target_modules="
                                           "q_proj+v_proj (pyalign/integrations/lora.py)")
    data: Optional[str] = setting(None, "JSONL/JSON/Parquet file or datasets directory in TRL's "
                                  "formats: preference (prompt/chosen/rejected or chosen/rejected), "
                                  "unpaired (prompt/completion/label; KTO, which takes pairs too), "
                                  "prompt-only (RL); needs --model")
    eval_data: Optional[str] = setting(None, "a dataset whose prompts the evaluations sample on "
                                       "(turns evaluation on)")
    reward: Optional[str] = setting(None, "RL with --data: path/to/file.py:function, module:function "
                                    "(a module of the working directory too) or a local "
                                    "sequence-classification reward-model directory; on the "
                                    "embedded task: proxy (its reward model) or gold")
    max_length: Optional[int] = setting(None, "truncate prompt + completion to this many tokens "
                                        "(the completion from the right)", bounds=">= 1")
    max_prompt_length: Optional[int] = setting(None, "truncate prompts to this many tokens (from "
                                               "the left)", bounds=">= 1")
    max_completion_length: int = setting(64, "tokens sampled per completion with --data",
                                         bounds=">= 1")
    steps: Optional[int] = setting(None, "optimizer steps of the run (default: from the epochs, "
                                   "or the embedded task's tuned count)", bounds=">= 1",
                                   aliases=("max_steps",))
    num_epochs: Optional[float] = setting(None, "passes over the data: steps = rows x epochs / "
                                          "batch_size", bounds="> 0", aliases=("num_train_epochs",))
    per_device_batch_size: Optional[int] = setting(
        None, "TRL's spelling of the batch: examples (RL: completions) per forward on one rank; "
        "sets micro_batch_size, and batch_size with gradient_accumulation_steps and the ranks",
        bounds=">= 1", aliases=("per_device_train_batch_size",))
    gradient_accumulation_steps: Optional[int] = setting(
        None, "TRL's spelling of the batch: micro-batches per optimizer step on one rank",
        bounds=">= 1")
    threads: Optional[int] = setting(None, "intra-op CPU threads (default: 1 for small models on "
                                     "CPU, else torch's)", bounds=">= 1")
    task_seed: int = setting(0, "the embedded task's seed", bounds=">= 0")
    task_cache_dir: Optional[str] = setting(None, "where the embedded task is cached")
    report_to: Union[list, str] = setting(None, "where the metrics go besides metrics.jsonl: "
                                          "none, tensorboard (OUT/tensorboard), wandb (several "
                                          "allowed)", choices=REPORT_TO, item_type=str,
                                          default_factory=lambda: ["none"])
    task: dict = setting(None, "the embedded task's sizes ([task] table)", flag=False,
                         default_factory=dict)
    study: Optional[dict] = setting(None, "a pyalign study point ([study] table)", flag=False)
    fingerprints: dict = setting(None, "what the run's files held (sha256): a resume with other "
                                 "files is refused", flag=False, default_factory=dict)


def check_unique_names() -> None:
    """No setting name (or alias) is both a run setting and a setting of a family's config;
    the one exception, ``reward``, is the run's (RLConfig's is set through it)."""
    run_names = names_of(RunSettings)
    for algorithm in ALGOS.values():
        clash = sorted(set(run_names) & set(names_of(algorithm.config_class)))
        if clash:
            raise RuntimeError(f"{algorithm.config_class.__name__} and RunSettings share {clash}")


def names_of(config_cls) -> dict[str, str]:
    """Every name a flag or config key may give a setting of ``config_cls`` -> its field name."""
    names = {}
    for name, field in declared(config_cls).items():
        for alias in (name, *field.metadata["aliases"]):
            names[alias] = name
    return names


def owner_types(config_cls) -> dict:
    """field name -> (declared type, field) of RunSettings and of ``config_cls``."""
    types_ = {}
    for cls in (RunSettings, config_cls):
        hints, fields = field_types(cls), declared(cls)
        types_.update({name: (hints[name], field) for name, field in fields.items()})
    return types_


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
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
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
    nested = [k for k, v in data.items() if isinstance(v, dict) and k not in TABLES]
    if nested:
        raise ConfigError(f"{path}: the only tables are [task] and [study]; {nested} must be flat "
                          f"key = value pairs")
    return data


def config_line(key: str, value) -> str:
    """One resolved setting as a config-file line: TOML that load_config_file reads back to the
    same value (an unset key, None, commented out: TOML has no null); ``lora`` as its spec text."""
    if value is None:
        return f"# {key} =   (not set)"
    if key == "lora":
        from pyalign.integrations.lora import format_lora_spec
        value = format_lora_spec(value)
    return f"{key} = {toml_value(value)}"


def printed_settings(algo: str, run: dict, config) -> list[str]:
    """``--print-config``: the settings a config file may hold for this run, resolved, as TOML
    lines that ``--config`` reads back to the same settings."""
    from pyalign.trainers.fields import applies_to
    algorithm = ALGOS[algo]
    lines = []
    for name in declared(RunSettings):
        value = run[name]
        if name == "reward" and value is None and algorithm.family == "rl":
            value = config.reward  # the embedded task's reward (RLConfig's, set through 'reward')
        lines.append(config_line(name, value))
    for name, field in declared(type(config)).items():
        if name in algorithm.fixed or name == "progress" or not applies_to(config, field):
            continue
        if name == "num_examples" and run["data"]:
            lines.append(f"# num_examples = {config.num_examples}   (the rows of {run['data']})")
            continue
        lines.append(config_line(name, getattr(config, name)))
    if run["task"]:
        lines.append(config_line("task", run["task"]))
    return lines


check_unique_names()

__all__ = ["RunSettings", "ConfigError", "TABLES", "REPORT_TO", "names_of", "owner_types",
           "load_config_file", "config_line", "printed_settings"]
