"""The policy-loss test cases shared by tests/ops/test_policy.py and
tests/ops/test_policy_rollout.py: the backends and the loss types whose code differs on each, the
input builder, the runner and the float64 oracle call (tests/support.py's policy64) with the op's
options."""
import math

import torch

import pyalign
from pyalign import losses
from support import ROLLOUT_METRICS, backends_for, policy64

BACKENDS = backends_for("policy")
# A kernel backend runs the same code for every loss that shares a policy-term branch and a ratio
# level (the PPO-clip losses differ only in their normalisation, torch code of the op that every
# backend shares): there, one loss per (kernel_id, ratio) of the registry; eager runs them all.
def _first_per_kernel_path():
    firsts = {}
    for name, entry in losses.POLICY_REGISTRY.items():
        firsts.setdefault((entry.kernel_id, entry.ratio), name)
    return tuple(firsts.values())


KERNEL_PATHS = _first_per_kernel_path()  # grpo, cispo, sapo, vespo, rloo


def losses_on(backend):
    """The policy losses whose code paths differ on ``backend``."""
    return losses.POLICY_NAMES if backend == "eager" else KERNEL_PATHS
METRICS = ("policy_loss", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "mean_kl",
           "mean_entropy", "mean_ratio") + ROLLOUT_METRICS


def levels_of(loss_type):
    return [None] if loss_type == "rloo" else ["token", "sequence"]


def policy_case(shape, *, spread=0.4, far=False, all_masked_row=True, per_token_adv=False):
    """Log-probs, old and reference log-probs, advantages, a mask (one row all masked) and entropies;
    NaN at every masked position (they must stay inert)."""
    rows, length = shape
    logprobs = -torch.rand(shape) * 3
    old = logprobs + torch.randn(shape) * spread
    if far:  # ratios e^±4..e^±6: far outside any clip range
        old = logprobs + torch.sign(torch.randn(shape)) * (4 + 2 * torch.rand(shape))
    ref = logprobs + torch.randn(shape) * 0.5
    advantages = torch.randn(shape if per_token_adv else (rows,))
    mask = torch.rand(shape) > 0.25
    mask[0, 0] = True
    if all_masked_row and rows > 1:
        mask[-1] = False
    entropy = torch.rand(shape) * 2
    for tensor in (logprobs, old, ref, entropy):
        tensor[~mask] = float("nan")
    return logprobs, old, ref, advantages, mask, entropy


def run(backend, logprobs, old, ref, advantages, mask, entropy, dtype=torch.float32, **options):
    leaf = logprobs.detach().to(dtype).clone().requires_grad_(True)
    entropy_leaf = None if entropy is None else entropy.detach().to(dtype).clone().requires_grad_(True)
    if options.get("rollout_logprobs") is not None:
        options = dict(options, rollout_logprobs=options["rollout_logprobs"].to(dtype))
    out = pyalign.policy_loss(leaf, None if old is None else old.to(dtype), advantages, mask,
                              ref_logprobs=None if ref is None else ref.to(dtype),
                              entropy=entropy_leaf, backend=backend, **options)
    out.loss.backward()
    return out, leaf.grad, None if entropy_leaf is None else entropy_leaf.grad


def oracle(logprobs, old, ref, advantages, mask, entropy, loss_type, options):
    """policy64 with the op's options, its gradients to logprobs and entropy by autograd."""
    lp = logprobs.detach().double().requires_grad_(True)
    ent = None if entropy is None else entropy.detach().double().requires_grad_(True)
    level = options.get("importance_sampling_level") or "token"
    loss, metrics = policy64(
        lp, lp.detach() if old is None else old, advantages, mask, loss_type, ref_logprobs=ref,
        beta=options.get("beta", 0.0), kl_estimator=options.get("kl_estimator", "k3"),
        bias_correction=options.get("use_bias_correction_kl", True),
        epsilon=options.get("epsilon", 0.2), epsilon_high=options.get("epsilon_high"),
        delta=options.get("delta"), level=level, entropy=ent,
        entropy_coef=options.get("entropy_coef", 0.0),
        top_entropy_quantile=options.get("top_entropy_quantile", 1.0),
        max_completion_length=options.get("max_completion_length"),
        num_items=options.get("num_items_in_batch"),
        rollout_logprobs=options.get("rollout_logprobs"),
        is_correction=options.get("vllm_importance_sampling_correction", True),
        is_mode=options.get("vllm_importance_sampling_mode", "sequence_mask"),
        is_clip_min=options.get("vllm_importance_sampling_clip_min"),
        is_clip_max=options.get("vllm_importance_sampling_clip_max", 3.0),
        off_policy_threshold=options.get("off_policy_mask_threshold"))
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []), allow_unused=True)
    grads = [torch.zeros_like(lp) if g is None else g for g in grads]
    return loss.detach(), metrics, grads[0], (grads[1] if ent is not None else None)


def loss_options(loss_type, level, with_kl, with_entropy):
    options = dict(loss_type=loss_type, max_completion_length=11)
    if level is not None:
        options["importance_sampling_level"] = level
    if loss_type == "cispo":
        options["epsilon_high"] = 1.3  # a cap the ratios cross
    elif loss_type in ("dapo", "bnpo"):
        options["epsilon_high"] = 0.28
    if loss_type == "grpo":
        options["delta"] = 1.5
    if loss_type == "dapo":
        options["num_items_in_batch"] = 23
    if with_kl:
        options.update(beta=0.04)
    if with_entropy:
        options.update(entropy_coef=0.01, top_entropy_quantile=0.6)
    return options


def check_against_oracle(out, grad, grad_entropy, expected, tol):
    loss64, metrics64, grad64, grad_entropy64 = expected
    torch.testing.assert_close(out.loss.double(), loss64, **tol)
    for name in METRICS:
        value, want = getattr(out, name).double(), metrics64[name]
        assert not getattr(out, name).requires_grad, name
        if math.isnan(want):
            assert torch.isnan(value), name
        else:
            torch.testing.assert_close(value, want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grad.double(), grad64, **tol)
    if grad_entropy64 is not None:
        torch.testing.assert_close(grad_entropy.double(), grad_entropy64, **tol)


FP32 = dict(rtol=1e-5, atol=1e-6)
