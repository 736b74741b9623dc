"""pyalign/_kv_cache.py: sampling keeps one cache object across calls under the keyword the model
takes, so greedy decoding with it equals decoding without any cache, with no deprecation warning
(tests/conftest.py fails a deprecated call made by pyalign), through wrappers too."""
import inspect

import pytest
import torch

from hf_models import tiny_config
from pyalign._kv_cache import cache_keyword
from pyalign.tasks import generate


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", 100)).eval()


class KwargsWrapper(torch.nn.Module):
    """A wrapper that names no keyword: its forward passes everything on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def _greedy_without_cache(model, prompts, steps):
    ids = prompts
    for _ in range(steps):
        next_token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids[:, prompts.shape[1]:]


@pytest.mark.parametrize("wrap", ["none", "kwargs", "peft"])
def test_greedy_sampling_with_the_cache_equals_recomputing_everything(model, wrap):
    wrapped = model
    if wrap == "kwargs":
        wrapped = KwargsWrapper(model)
    elif wrap == "peft":
        peft = pytest.importorskip("peft", reason="peft is not installed ([test] extra)")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    keyword = cache_keyword(wrapped)
    assert keyword == cache_keyword(model) and keyword in inspect.signature(model.forward).parameters
    prompts = torch.randint(0, 100, (3, 5))
    sampled = generate(wrapped, prompts, 6, temperature=0)
    torch.testing.assert_close(sampled, _greedy_without_cache(model, prompts, 6), rtol=0, atol=0)
