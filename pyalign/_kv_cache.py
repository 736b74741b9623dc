"""The KV cache of a transformers causal LM while pyalign samples from it (pyalign.tasks.generate,
pyalign.data's DatasetTask.generate), with no deprecated keyword on any transformers release.

The sampler makes one ``DynamicCache`` for the whole draw (the model fills it in place, call after
call) and passes it under the keyword the model's forward declares: ``cache`` on the releases that
renamed it, ``past_key_values`` before (where ``past_key_values`` now warns a FutureWarning that
it will be removed). Nothing here reads the cache back from the model's output, whose
``past_key_values`` attribute warns as well.

    cache = sampling_cache(model)
    out = model(input_ids=prompts, use_cache=True, **cache)
    out = model(input_ids=next_tokens, use_cache=True, **cache)   # the same cache, extended
"""
from __future__ import annotations

import inspect

import torch

# The keyword of the current releases first: a forward that still accepts the old one beside the
# new one (for backward compatibility) gets the new one.
_KEYWORDS = ("cache", "past_key_values")


def _forwards(model: torch.nn.Module):
    """The forward of ``model`` and of the models it wraps (DDP's ``module``, peft's base model),
    outermost first: a wrapper's forward often takes ``**kwargs`` and passes them inward."""
    seen = set()
    while isinstance(model, torch.nn.Module) and id(model) not in seen:
        seen.add(id(model))
        yield model.forward
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else getattr(model, "module", None)
        model = inner


def cache_keyword(model: torch.nn.Module) -> str:
    """``"cache"`` or ``"past_key_values"``: the KV-cache keyword of ``model``'s forward (the first
    of its wrapped models that names one), else that of the installed transformers release (a
    wrapper whose forward passes ``**kwargs`` to a model held under another attribute)."""
    for forward in _forwards(model):
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):  # a builtin or C forward: look further in
            continue
        for keyword in _KEYWORDS:
            if keyword in parameters:
                return keyword
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def sampling_cache(model: torch.nn.Module) -> dict:
    """``{keyword: DynamicCache}`` to pass to every forward of one sampling loop of ``model``."""
    from transformers import DynamicCache

    return {cache_keyword(model): DynamicCache(config=getattr(model, "config", None))}
