"""``--reward``: what RL trains on with user data, as a function of (prompts, completions) lists
(TRL's reward-function convention, ``reward_funcs``): ``path/to/file.py:function`` (the file is
loaded as a module), ``module:function`` (imported, from the working directory too), called
``function(prompts=..., completions=...)`` and returning one float per completion; or a local
sequence-classification reward-model directory (AutoModelForSequenceClassification and its
own tokenizer; the score is logit 0 of prompt + completion, rendered with the reward
tokenizer's chat template for conversational data, as TRL's GRPO/RLOO trainers score it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable

import torch


class RewardError(ValueError):
    """A --reward that cannot be loaded or that returned something else than one float each."""


def load_reward(spec: str, *, conversational: bool, flag: str = "--reward") -> Callable[[list, list], list]:
    """The reward function (prompts, completions) -> list of floats of ``spec``; errors name
    ``flag`` (``pyalign study --gold-reward`` loads its gold reward here too)."""
    if os.path.isdir(spec):
        return _reward_model(f"{flag} {spec}", spec, conversational)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise RewardError(f"{flag} {spec!r}: expected path/to/file.py:function, module:function "
                          f"or a reward-model directory")
    module = _module(target, f"{flag} {spec}")
    function = getattr(module, attr, None)
    if not callable(function):
        raise RewardError(f"{flag} {spec}: {target} has no function {attr!r}")

    def reward(prompts: list, completions: list) -> list:
        values = function(prompts=prompts, completions=completions)
        return _checked(values, len(completions), f"{flag} {spec}")
    return reward


def _module(target: str, spec: str):
    """The module of a --reward spec: a ``.py`` file loaded by path, or a module imported with
    the working directory first on the path (where a user's reward file usually is)."""
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise RewardError(f"{spec}: no such file {target}")
        name = "pyalign_reward_" + os.path.splitext(os.path.basename(target))[0]
        loader = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as exc:
            raise RewardError(f"{spec}: {target} failed to load: {type(exc).__name__}: "
                              f"{exc}") from exc
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise RewardError(f"{spec}: cannot import {target}: {exc} (a file "
                          f"{target.replace('.', '/')}.py of the working directory, a module on the "
                          f"Python path, or pass path/to/file.py:function)") from exc
    finally:
        sys.path.remove(os.getcwd())


def _checked(values, count: int, spec: str) -> list:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{spec}: must return a list of floats, got {values!r}") from exc
    if len(values) != count:
        raise RewardError(f"{spec}: returned {len(values)} rewards for {count} completions")
    return values


def _reward_model(spec: str, path: str, conversational: bool):
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise RewardError(f"{spec}: cannot load a sequence-classification model and its "
                          f"tokenizer from it: {exc}") from exc
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise RewardError(f"{spec}: conversational data needs a reward tokenizer with a "
                          f"chat template; this one has none")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # it finds each row's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    model.float().eval().requires_grad_(False)
    limit = getattr(model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def reward(prompts: list, completions: list) -> list:
        if conversational:
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False)
                     for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=True,
                          truncation=limit is not None, max_length=limit)
        return model(**batch).logits[:, 0].float().tolist()
    return reward


__all__ = ["RewardError", "load_reward"]
