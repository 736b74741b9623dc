"""``--reward``: what RL trains on with user data, as a function of (prompts, completions) lists
(TRL's reward-function convention, ``reward_funcs``): either ``module:function`` (imported; it
is called ``function(prompts=..., completions=...)`` and returns one float per completion) or a
local sequence-classification reward-model directory (AutoModelForSequenceClassification and its
own tokenizer; the score is logit 0 of prompt + completion, rendered with the reward
tokenizer's chat template for conversational data, as TRL's GRPO/RLOO trainers score it).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch


class RewardError(ValueError):
    """A --reward that cannot be loaded or that returned something else than one float each."""


def load_reward(spec: str, *, conversational: bool) -> Callable[[list, list], list]:
    """The reward function (prompts, completions) -> list of floats of ``spec``."""
    if os.path.isdir(spec):
        return _reward_model(spec, conversational)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"--reward {spec!r}: expected a reward-model directory or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"--reward {spec}: cannot import {module_name}: {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise RewardError(f"--reward {spec}: {module_name} has no function {attr!r}")

    def reward(prompts: list, completions: list) -> list:
        values = function(prompts=prompts, completions=completions)
        return _checked(values, len(completions), spec)
    return reward


def _checked(values, count: int, spec: str) -> list:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"--reward {spec}: must return a list of floats, got {values!r}") from exc
    if len(values) != count:
        raise RewardError(f"--reward {spec}: returned {len(values)} rewards for {count} completions")
    return values


def _reward_model(path: str, conversational: bool):
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise RewardError(f"--reward {path}: cannot load a sequence-classification model and its "
                          f"tokenizer from it: {exc}") from exc
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise RewardError(f"--reward {path}: conversational data needs a reward tokenizer with a "
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
