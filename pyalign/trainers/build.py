"""A trainer from resolved run settings (``pyalign/trainers/resolve.py``): the embedded task or
the user's model and data (``pyalign.data``), a LoRA adapter, and the intra-op thread rule.
Errors in the model, the data or the reward are ConfigError / DataError / RewardError, raised
before any training.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional

from pyalign.trainers.presets import ALGOS
from pyalign.trainers.settings import ConfigError

# Below this many parameters a CPU run uses one intra-op thread unless told otherwise: the
# matrices are too small to split, and threads contending for busy cores cost several-fold.
SMALL_MODEL_PARAMS = 5_000_000


def set_threads(requested: Optional[int], on_cpu: bool, model=None) -> None:
    """The intra-op thread rule of a training run: ``requested`` when given; on CPU one thread
    for a model under SMALL_MODEL_PARAMS (``model`` None: the embedded task's, always small);
    else torch's default."""
    import torch
    if requested:
        torch.set_num_threads(requested)
    elif on_cpu and (model is None or sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS):
        torch.set_num_threads(1)


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
    num_examples = the number of examples; DataError/RewardError for bad data, before training."""
    from pyalign.data import DatasetTask, load_rows, tokenize_rows
    from pyalign.data.rewards import load_reward
    if ALGOS[algo].family == "rl":
        kind = "prompt"
    else:
        kind = "unpaired" if config.loss_kind == "unpaired" else "preference"
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
                       reward=reward, reward_spec=run["reward"])
    if reward is not None:  # one call before training: a reward that cannot score fails here
        task.check_reward()
    if ALGOS[algo].family == "preference":
        if len(train) < config.batch_size:
            raise ConfigError(f"{run['data']} has {len(train)} rows, fewer than batch_size "
                              f"{config.batch_size}")
        config = dataclasses.replace(config, num_examples=len(train))
        config.validate()
    return task, config


def build_trainer(algo: str, run: dict, config, *, dist_ctx=None, progress: bool = True):
    """The task, the model factory and the trainer of a resolved configuration."""
    import pyalign.tasks
    from pyalign.trainers.distributed import init_distributed

    dist_ctx = dist_ctx or init_distributed()
    cls = ALGOS[algo].trainer
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


__all__ = ["SMALL_MODEL_PARAMS", "set_threads", "lora_factory", "load_hf_model", "load_user_model",
           "build_data_task", "build_trainer"]
