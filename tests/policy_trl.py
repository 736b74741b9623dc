"""TRL 1.16's own policy-loss code on given tensors, for the parity tests of
tests/ops/test_policy.py and tests/ops/test_policy_rollout.py: GRPOTrainer's and RLOOTrainer's methods
compiled from the installed trl source (without importing the trainer modules, which need
accelerate/pandas/datasets), the model forward stubbed to return the given log-probs."""
import ast
import functools
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pyalign import losses


@functools.lru_cache(maxsize=None)
def trl_functions(module_file, names):
    """The named methods of a TRL trainer, compiled from the installed TRL source itself (without
    importing the trainer module, which needs accelerate/pandas/datasets); parsed once per test
    process."""
    tree = ast.parse(Path(module_file).read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
            # torch.no_grad() stays (vespo's weight is detached that way); profiling and
            # staticmethod wrappers go
            node.decorator_list = [d for d in node.decorator_list if "no_grad" in ast.unparse(d)]
            found[node.name] = node
    assert set(found) == set(names), f"TRL source lacks {set(names) - set(found)}"
    namespace = _trl_namespace()
    module = ast.Module(body=list(found.values()), type_ignores=[])
    exec(compile(module, module_file, "exec"), namespace)  # noqa: S102 - TRL's own code
    return {name: namespace[name] for name in names}


def _trl_namespace():
    """The module globals TRL's compiled methods read (its nanmin/nanmax of trl.trainer.utils)."""
    return {"torch": torch, "math": math,
            "nanmin": lambda t: t[~torch.isnan(t)].min() if (~torch.isnan(t)).any() else t[0],
            "nanmax": lambda t: t[~torch.isnan(t)].max() if (~torch.isnan(t)).any() else t[0]}


def trl_dir():
    import importlib.util
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed: the TRL 1.16 parity tests need it (the [test] extra installs it)")
    return Path(spec.origin).parent / "trainer"


class FakeAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


@functools.lru_cache(maxsize=None)
def _trl_sampling_correction(module_file):
    """TRL's vLLM importance-sampling blocks of GRPOTrainer._generate_and_score_completions (the
    ratio, then its metrics), as a function of the tensors they read; returns the ratio."""
    tree = ast.parse(Path(module_file).read_text())
    method = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and node.name == "_generate_and_score_completions")
    condition = "self.use_vllm and self.vllm_importance_sampling_correction"
    blocks = [node for node in ast.walk(method) if isinstance(node, ast.If)
              and ast.unparse(node.test) == condition
              and any(marker in ast.unparse(node) for marker in
                      ("vllm_importance_sampling_ratio = torch.exp", "importance_sampling_ratio/min"))]
    assert len(blocks) == 2, "TRL's importance-sampling code moved"
    blocks.sort(key=lambda node: node.lineno)
    source = ("def sampling_correction(self, old_per_token_logps, sampling_per_token_logps, "
              "completion_mask, tool_mask, mode, device):\n"
              + "\n".join("    " + line for block in blocks for line in ast.unparse(block).split("\n"))
              + "\n    return vllm_importance_sampling_ratio\n")
    namespace = _trl_namespace()
    exec(compile(source, module_file, "exec"), namespace)  # noqa: S102 - TRL's own code
    return namespace["sampling_correction"]


def trl_grpo(loss_type, logprobs, old, ref, advantages, mask, entropy, *, beta=0.0, epsilon=0.2,
             epsilon_high=None, delta=None, level="token", entropy_coef=0.0,
             top_entropy_quantile=1.0, max_completion_length=None, num_items=None,
             bias_correction=True, rollout=None, is_mode="sequence_mask", is_clip_min=None,
             is_clip_max=3.0, off_policy_threshold=None):
    """TRL 1.16 GRPOTrainer._compute_loss on given per-token log-probs (its model forward stubbed
    to return them): (loss, {metric name: value}). With the sampler's log-probs ``rollout``, TRL's
    vLLM importance-sampling code (``vllm_importance_sampling_*`` = ``is_*``) makes the ratio
    and its metrics first, as in _generate_and_score_completions."""
    module_file = trl_dir() / "grpo_trainer.py"
    fns = trl_functions(module_file, ("_compute_loss", "get_high_entropy_mask",
                                      "get_gamma_weights", "get_off_policy_mask"))
    rows, length = logprobs.shape
    args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta,
                                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                 vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                 vespo_lambda_neg=2.0, steps_per_generation=1, entropy_target=0.0)
    trainer = types.SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        importance_sampling_level=level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_threshold, use_vllm=rollout is not None,
        vllm_importance_sampling_correction=rollout is not None,
        vllm_importance_sampling_mode=is_mode, vllm_importance_sampling_clip_min=is_clip_min,
        vllm_importance_sampling_clip_max=is_clip_max,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=FakeAccelerator(),
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    trainer.get_high_entropy_mask = types.MethodType(fns["get_high_entropy_mask"], trainer)
    trainer.get_gamma_weights = fns["get_gamma_weights"]
    trainer.get_off_policy_mask = fns["get_off_policy_mask"]
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    sampling = {}
    if rollout is not None:
        ratio = _trl_sampling_correction(module_file)(trainer, old, rollout, mask.long(), None,
                                                      "train", logprobs.device)
        sampling = {"importance_sampling_ratio": ratio, "sampling_per_token_logps": rollout}
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, length, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items)),
              **sampling}
    loss = fns["_compute_loss"](trainer, None, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def trl_rloo(logprobs, old_logps, advantages, mask, entropy, epsilon=0.2, epsilon_high=None):
    fns = trl_functions(trl_dir() / "rloo_trainer.py", ("_compute_loss",))
    rows, length = logprobs.shape
    trainer = types.SimpleNamespace(
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        model=types.SimpleNamespace(training=True), accelerator=FakeAccelerator(),
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, length, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages, "old_logps": old_logps}
    loss = fns["_compute_loss"](trainer, None, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def trl_case(shape=(4, 9), far=False):
    """TRL multiplies by the mask, so its inputs hold no NaN; every row keeps a token."""
    logprobs = -torch.rand(shape, dtype=torch.float64) * 3
    old = logprobs + (torch.randn(shape, dtype=torch.float64) * (2.0 if far else 0.3))
    ref = logprobs + torch.randn(shape, dtype=torch.float64) * 0.5
    advantages = torch.randn(shape[0], dtype=torch.float64)
    mask = torch.rand(shape) > 0.3
    mask[:, 0] = True
    entropy = torch.rand(shape, dtype=torch.float64) * 2
    return logprobs, old, ref, advantages, mask, entropy


TRL_GRPO_TYPES = [name for name in losses.POLICY_NAMES if name != "rloo"]
