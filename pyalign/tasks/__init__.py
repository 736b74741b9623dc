"""Download-free alignment tasks: a synthetic language, a tiny SFT model, a gold reward and a
proxy reward model that can be over-optimised.

    task = pyalign.tasks.make_task(seed=0)          # seconds the first time, cached after
    policy = task.new_policy()                      # LlamaForCausalLM, trainable
    g = torch.Generator().manual_seed(0)
    prompts = task.prompts(64, g)
    responses = task.generate(policy, prompts, generator=g)
    task.gold_reward(prompts, responses), task.proxy_reward(prompts, responses)

The language, its grammar and the gold reward are in ``pyalign.tasks.language``; the proxy reward
model in ``pyalign.tasks.proxy``; building, caching and sampling in ``pyalign.tasks.task``; the
variable-length variant (responses that end at EOS, labellers who like length) in
``pyalign.tasks.lengthy``; the model-size ladder is ``MODEL_SIZES``:

    task = make_task(0, config=TaskConfig(**lengthy.LENGTHY, **MODEL_SIZES["large"]))
"""
from . import lengthy
from .language import gold_reward
from .task import MODEL_SIZES, Task, TaskConfig, cache_key, generate, make_task

__all__ = ["Task", "TaskConfig", "MODEL_SIZES", "make_task", "gold_reward", "generate", "cache_key",
           "lengthy"]
