"""pyalign.policy_loss (every policy loss_type of the registry) on every backend of the test device
(support.backends_for) against the float64 oracle of tests/support.py: the loss, the metrics and
the per-token gradients, token and sequence level, KL and entropy terms on and off, NaN in masked
positions, an all-masked row, B = 1 and odd T, ratios far outside the clip range, fp32 and bf16;
each registry entry's hand-derived gradient against autograd of its forward; TRL 1.16's own loss
code (its _compute_loss source) on the same tensors; bad input."""
import ast
import functools
import inspect
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign import losses
from support import ON_CPU, backends_for, policy64, same_under_thread_counts

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
           "mean_entropy", "mean_ratio")


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
        num_items=options.get("num_items_in_batch"))
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
MATRIX = [(backend, lt, level, kl, ent) for backend in BACKENDS for lt in losses_on(backend)
          for level in levels_of(lt) for kl in (False, True) for ent in (False, True)]


@pytest.mark.parametrize("backend,loss_type,level,with_kl,with_entropy", MATRIX,
                         ids=[f"{b}-{lt}-{lv}-{'kl' if k else 'nokl'}-{'ent' if e else 'noent'}"
                              for b, lt, lv, k, e in MATRIX])
def test_values_metrics_and_grads_match_float64(backend, loss_type, level, with_kl, with_entropy):
    shape = (3, 7) if backend == "triton" and ON_CPU else (5, 37)
    logprobs, old, ref, advantages, mask, entropy = policy_case(shape)
    options = loss_options(loss_type, level, with_kl, with_entropy)
    ref = ref if with_kl else None
    entropy = entropy if with_entropy else None
    out, grad, grad_entropy = run(backend, logprobs, old, ref, advantages, mask, entropy, **options)
    expected = oracle(logprobs, old, ref, advantages, mask, entropy, loss_type, options)
    check_against_oracle(out, grad, grad_entropy, expected, FP32)
    assert torch.all(grad[~mask] == 0)
    if with_entropy:
        assert torch.all(grad_entropy[~mask] == 0)


SHAPES = [(1, 1), (1, 9), (2, 1), (3, 129)]


@pytest.mark.parametrize("backend,loss_type", [(b, lt) for b in BACKENDS for lt in losses_on(b)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
def test_awkward_shapes_and_far_ratios(backend, loss_type, shape, far):
    if backend == "triton" and ON_CPU and shape[1] > 9:
        shape = (3, 17)
    logprobs, old, ref, advantages, mask, entropy = policy_case(shape, far=far)
    for level in levels_of(loss_type):
        options = loss_options(loss_type, level, True, True)
        out, grad, grad_entropy = run(backend, logprobs, old, ref, advantages, mask, entropy,
                                      **options)
        expected = oracle(logprobs, old, ref, advantages, mask, entropy, loss_type, options)
        assert torch.isfinite(out.loss)
        check_against_oracle(out, grad, grad_entropy, expected, dict(rtol=2e-5, atol=1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", losses.POLICY_NAMES)
def test_per_token_advantages(backend, loss_type):
    logprobs, old, ref, advantages, mask, entropy = policy_case((3, 8), per_token_adv=True)
    for level in levels_of(loss_type):
        options = loss_options(loss_type, level, True, False)
        out, grad, _ = run(backend, logprobs, old, ref, advantages, mask, None, **options)
        expected = oracle(logprobs, old, ref, advantages, mask, None, loss_type, options)
        check_against_oracle(out, grad, None, expected, FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo", "rloo"])
def test_bfloat16(backend, loss_type):
    logprobs, old, ref, advantages, mask, entropy = policy_case((3, 9))
    bf16 = [None if t is None else t.to(torch.bfloat16) for t in (logprobs, old, ref, entropy)]
    options = loss_options(loss_type, levels_of(loss_type)[-1], True, True)
    out, grad, grad_entropy = run(backend, bf16[0], bf16[1], bf16[2], advantages, mask, bf16[3],
                                  dtype=torch.bfloat16, **options)
    assert grad.dtype == grad_entropy.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    # the oracle on the same (rounded) inputs: fp32 math, the gradient rounded to bf16
    expected = oracle(bf16[0], bf16[1], bf16[2], advantages, mask, bf16[3], loss_type, options)
    check_against_oracle(out, grad, grad_entropy, expected, dict(rtol=1e-2, atol=1e-4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", losses.POLICY_NAMES)
def test_on_policy_ratio_is_one(backend, loss_type):
    """num_iterations == 1 (old_logprobs None): ratio 1, nothing clipped, and for the PPO-clip
    losses the gradient is the advantage-weighted log-prob gradient."""
    logprobs, _, _, advantages, mask, _ = policy_case((4, 6))
    options = loss_options(loss_type, levels_of(loss_type)[0], False, False)
    out, grad, _ = run(backend, logprobs, None, None, advantages, mask, None, **options)
    assert out.mean_ratio == 1 and out.clip_ratio_region == 0
    expected = oracle(logprobs, None, None, advantages, mask, None, loss_type, options)
    check_against_oracle(out, grad, None, expected, FP32)
    if loss_type == "grpo":
        counts = mask.sum(-1, keepdim=True).clamp(min=1).double()
        want = torch.where(mask, -advantages[:, None].double() / (counts * mask.shape[0]), 0.0)
        torch.testing.assert_close(grad.double(), want, **FP32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_thread_count_does_not_change_results(backend):
    logprobs, old, ref, advantages, mask, entropy = policy_case((64, 300))

    def once():
        out, grad, grad_entropy = run(backend, logprobs, old, ref, advantages, mask, entropy,
                                      **loss_options("grpo", "sequence", True, True))
        return out.loss, grad, grad_entropy
    same_under_thread_counts(once)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logprobs = torch.empty(0, 4, requires_grad=True)
    out = pyalign.policy_loss(logprobs, None, torch.empty(0), torch.empty(0, 4, dtype=torch.bool),
                              backend=backend)
    out.loss.backward()
    assert out.loss == 0 and logprobs.grad.shape == (0, 4)


@pytest.mark.parametrize("loss_type", [n for n in losses.POLICY_NAMES if n not in ("cispo", "vespo")])
def test_gradcheck_float64(loss_type):
    """Finite differences of the float64 loss (cispo and vespo weight logp by a stop-gradient
    coefficient, so their gradient is not the derivative of their value: the oracle tests cover
    them)."""
    logprobs, old, ref, advantages, mask, entropy = policy_case((3, 5), spread=0.15)
    for level in levels_of(loss_type):
        options = loss_options(loss_type, level, True, False)
        options["entropy_coef"] = 0.02
        lp = torch.where(mask, logprobs, -1.0).double().requires_grad_(True)
        ent = torch.where(mask, entropy, 1.0).double().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, e, options=options: pyalign.policy_loss(
                a, old.double(), advantages.double(), mask, ref_logprobs=ref.double(), entropy=e,
                **options).loss, (lp, ent))


# ------------------------------------------------------------------------- the registry entries

@pytest.mark.parametrize("loss_type", losses.POLICY_NAMES)
def test_registry_gradient_matches_autograd_of_its_forward(loss_type):
    entry = losses.POLICY_REGISTRY[loss_type]
    n = 400
    # ratios across and on the clip edges, advantages of both signs (and 0)
    ratio = torch.cat([torch.exp(torch.randn(n, dtype=torch.float64)),
                       torch.tensor([0.8, 1.2, 1.0, 1.5, 0.5], dtype=torch.float64)])
    advantages = torch.randn(ratio.shape, dtype=torch.float64)
    advantages[-1] = 0.0
    logprobs = -torch.rand(ratio.shape, dtype=torch.float64) * 3
    log_ratio_sum = torch.randn(ratio.shape, dtype=torch.float64) * 3
    params = losses.PolicyParams(epsilon_low=0.2, epsilon_high=0.2 if entry.clip_metric == "ppo"
                                 else 1.3, delta=1.5 if entry.clip_metric == "ppo" else None)
    for chosen in {params, losses.PolicyParams()}:
        leaves = [ratio.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)]
        value = entry.forward(leaves[0], advantages, leaves[1], log_ratio_sum, chosen)
        want_ratio, want_direct = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
        d_ratio, direct = entry.grad(ratio, advantages, logprobs, log_ratio_sum, chosen)
        zeros = torch.zeros_like(ratio)
        torch.testing.assert_close(d_ratio, zeros if want_ratio is None else want_ratio,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(direct, zeros if want_direct is None else want_direct,
                                   rtol=1e-12, atol=1e-12)


def test_everything_derives_from_the_registry():
    assert losses.POLICY_NAMES == tuple(losses.POLICY_REGISTRY)
    for entry in losses.POLICY_REGISTRY.values():
        assert entry.equation and entry.paper.count(".") == 1, entry.name
        assert entry.normalisation in losses.POLICY_NORMALISATIONS
    assert set(losses.policy_kernel_ids().values()) == set(range(losses.POLICY_KERNEL_BRANCHES))


# --------------------------------------------------------------------------- TRL 1.16 parity

@functools.lru_cache(maxsize=None)
def _trl_functions(module_file, names):
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
    namespace = {"torch": torch, "math": math,
                 "nanmin": lambda t: t[~torch.isnan(t)].min() if (~torch.isnan(t)).any() else t[0],
                 "nanmax": lambda t: t[~torch.isnan(t)].max() if (~torch.isnan(t)).any() else t[0]}
    module = ast.Module(body=list(found.values()), type_ignores=[])
    exec(compile(module, module_file, "exec"), namespace)  # noqa: S102 - TRL's own code
    return {name: namespace[name] for name in names}


def _trl_dir():
    import importlib.util
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed: the TRL 1.16 parity tests need it (the [test] extra installs it)")
    return Path(spec.origin).parent / "trainer"


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


def trl_grpo(loss_type, logprobs, old, ref, advantages, mask, entropy, *, beta=0.0, epsilon=0.2,
             epsilon_high=None, delta=None, level="token", entropy_coef=0.0,
             top_entropy_quantile=1.0, max_completion_length=None, num_items=None,
             bias_correction=True):
    """TRL 1.16 GRPOTrainer._compute_loss on given per-token log-probs (its model forward stubbed
    to return them): (loss, {metric name: value})."""
    fns = _trl_functions(_trl_dir() / "grpo_trainer.py",
                         ("_compute_loss", "get_high_entropy_mask", "get_gamma_weights"))
    rows, length = logprobs.shape
    args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta,
                                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                 vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                 vespo_lambda_neg=2.0, steps_per_generation=1, entropy_target=0.0)
    trainer = types.SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        importance_sampling_level=level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, accelerator=_Accelerator(),
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    trainer.get_high_entropy_mask = types.MethodType(fns["get_high_entropy_mask"], trainer)
    trainer.get_gamma_weights = fns["get_gamma_weights"]
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, length, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    loss = fns["_compute_loss"](trainer, None, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def trl_rloo(logprobs, old_logps, advantages, mask, entropy, epsilon=0.2, epsilon_high=None):
    fns = _trl_functions(_trl_dir() / "rloo_trainer.py", ("_compute_loss",))
    rows, length = logprobs.shape
    trainer = types.SimpleNamespace(
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
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
TRL_CASES = [(backend, lt, level, kl, ent) for backend in BACKENDS
             for lt in TRL_GRPO_TYPES if lt in losses_on(backend) for level in ("token", "sequence")
             for kl in (False, True) for ent in (False, True)]


@pytest.mark.parametrize("backend,loss_type,level,with_kl,with_entropy", TRL_CASES,
                         ids=[f"{b}-{lt}-{lv}-{'kl' if k else 'nokl'}-{'ent' if e else 'noent'}"
                              for b, lt, lv, k, e in TRL_CASES])
def test_matches_trl_grpo_trainer(backend, loss_type, level, with_kl, with_entropy):
    logprobs, old, ref, advantages, mask, entropy = trl_case(far=loss_type in ("grpo", "cispo"))
    options = loss_options(loss_type, level, with_kl, with_entropy)
    if backend != "eager":  # the kernels take fp32: TRL runs on the same fp32-rounded values
        logprobs, old, ref, advantages, entropy = (t.float().double() for t in
                                                   (logprobs, old, ref, advantages, entropy))
    leaf = logprobs.detach().clone().requires_grad_(True)
    ent_leaf = entropy.detach().clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_grpo(
        loss_type, leaf, old, ref, advantages, mask, ent_leaf, beta=options.get("beta", 0.0),
        epsilon_high=options.get("epsilon_high"), delta=options.get("delta"), level=level,
        entropy_coef=options.get("entropy_coef", 0.0),
        top_entropy_quantile=options.get("top_entropy_quantile", 1.0),
        max_completion_length=options["max_completion_length"],
        num_items=options.get("num_items_in_batch"))
    trl_grads = torch.autograd.grad(trl_loss, [leaf, ent_leaf], allow_unused=True)
    dtype = torch.float64 if backend == "eager" else torch.float32
    ours, grad, grad_entropy = run(backend, logprobs, old, ref if with_kl else None, advantages,
                                   mask, entropy, dtype=dtype, **options)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else FP32
    if loss_type == "sapo" and dtype == torch.float64:  # TRL rounds sapo's temperatures to fp32
        tol = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.loss.double(), trl_loss.detach(), **tol)
    torch.testing.assert_close(grad.double(), trl_grads[0], **tol)
    if with_entropy:
        want = trl_grads[1] if trl_grads[1] is not None else torch.zeros_like(entropy)
        torch.testing.assert_close(grad_entropy.double(), want, **tol)
    names = {"clip_ratio/low_mean": "clip_ratio_low", "clip_ratio/high_mean": "clip_ratio_high",
             "clip_ratio/region_mean": "clip_ratio_region", "cispo_clip_ratio": "clip_ratio_high",
             "kl": "mean_kl", "entropy": "mean_entropy", "policy_loss": "policy_loss"}
    compared = 0
    for trl_name, value in trl_metrics.items():
        if trl_name in names:
            torch.testing.assert_close(getattr(ours, names[trl_name]).double().item(), value,
                                       rtol=1e-5, atol=1e-6, msg=trl_name)
            compared += 1
    assert compared >= 1  # the entropy at least


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
def test_matches_trl_rloo_trainer(backend, far):
    logprobs, old, _, advantages, mask, entropy = trl_case(far=far)
    old_logps = torch.where(mask, old, 0.0).sum(-1)
    if far:
        old_logps = torch.where(mask, logprobs, 0.0).sum(-1) + torch.randn(4, dtype=torch.float64) * 0.3
    if backend != "eager":
        logprobs, old, advantages = (t.float().double() for t in (logprobs, old, advantages))
    # pyalign takes per-token old log-probs: any split of the sequence sum gives the same loss
    counts = mask.sum(-1, keepdim=True).double()
    old_tokens = torch.where(mask, old_logps[:, None] / counts, 0.0)
    if backend != "eager":
        old_logps = torch.where(mask, old_tokens.float().double(), 0.0).sum(-1)
    leaf = logprobs.detach().clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_rloo(leaf, old_logps, advantages, mask, entropy)
    (trl_grad,) = torch.autograd.grad(trl_loss, [leaf])
    dtype = torch.float64 if backend == "eager" else torch.float32
    ours, grad, _ = run(backend, logprobs, old_tokens, None, advantages, mask, entropy,
                        dtype=dtype, loss_type="rloo")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss.double(), trl_loss.detach(), **tol)
    torch.testing.assert_close(grad.double(), trl_grad, **tol)
    for trl_name, name in (("clip_ratio/low_mean", "clip_ratio_low"),
                           ("clip_ratio/high_mean", "clip_ratio_high"),
                           ("clip_ratio/region_mean", "clip_ratio_region"),
                           ("entropy", "mean_entropy")):
        torch.testing.assert_close(getattr(ours, name).double().item(), trl_metrics[trl_name],
                                   rtol=1e-5, atol=1e-6, msg=trl_name)


def test_trl_source_is_the_installed_one():
    """The parity tests compile TRL's methods from the installed trl package: check it is 1.16
    and that the functions contain the loss types we claim (a TRL change shows up here)."""
    import importlib.metadata
    _trl_dir()  # skips without TRL
    assert importlib.metadata.version("trl").startswith("1.16")
    source = (_trl_dir() / "grpo_trainer.py").read_text()
    for name in TRL_GRPO_TYPES:
        assert f'"{name}"' in source, name
    assert inspect.isfunction(_trl_functions(_trl_dir() / "grpo_trainer.py", ("_compute_loss",))[
        "_compute_loss"])


# ------------------------------------------------------------------------------- bad input

def _good():
    logprobs = -torch.rand(2, 3)
    return dict(logprobs=logprobs, old_logprobs=logprobs + 0.1, advantages=torch.randn(2),
                mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("change,error,match", [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(epsilon=-0.1), ValueError, "epsilon must be"),
    (dict(epsilon_high=-1.0), ValueError, "epsilon_high must be"),
    (dict(loss_type="cispo", epsilon_high=0.0), ValueError, "epsilon_high"),
    (dict(delta=1.0), ValueError, "delta must be"),
    (dict(delta=2.0, loss_type="sapo"), ValueError, "delta"),
    (dict(top_entropy_quantile=0.0, entropy=torch.rand(2, 3)), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5, entropy=torch.rand(2, 3)), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5), ValueError, "need entropy"),
    (dict(entropy_coef=0.1), ValueError, "need entropy"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(beta=0.1), ValueError, "ref_logprobs"),
    (dict(beta=-0.1, ref_logprobs=torch.rand(2, 3)), ValueError, "beta must be"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (dict(loss_type="rloo", importance_sampling_level="token"), ValueError, "rloo"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl"),
    (dict(mask=torch.full((2, 3), 0.5)), ValueError, "mask must be bool or hold only 0 and 1, got 0.5"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask has shape"),
    (dict(advantages=torch.randn(3)), ValueError, "advantages has shape"),
    (dict(old_logprobs=torch.rand(2, 4)), ValueError, "old_logprobs has shape"),
    (dict(logprobs=torch.rand(6)), ValueError, "logprobs must be 2-D"),
    (dict(logprobs=torch.ones(2, 3, dtype=torch.long)), TypeError, "logprobs must be a floating"),
    (dict(ref_logprobs=torch.rand(3, 3)), ValueError, "ref_logprobs has shape"),
    (dict(entropy=torch.rand(2, 2), entropy_coef=0.1), ValueError, "entropy has shape"),
    (dict(max_completion_length=0), ValueError, "max_completion_length"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (dict(sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos"),
    (dict(epsilon="0.2"), TypeError, "epsilon must be a real"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    kwargs = {**_good(), **change}
    positional = [kwargs.pop(name) for name in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(error, match=match):
        pyalign.policy_loss(*positional, **kwargs)


# ------------------------------------------------------------------------- NaN, torch.compile

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo", "rloo"])
def test_nan_in_a_kept_token_propagates(backend, loss_type):
    logprobs, old, ref, advantages, mask, entropy = policy_case((3, 6))
    logprobs[0, 0] = float("nan")  # mask[0, 0] is True
    out, grad, _ = run(backend, logprobs, old, ref, advantages, mask, None,
                       **loss_options(loss_type, levels_of(loss_type)[0], True, False))
    assert torch.isnan(out.loss) and torch.isnan(grad[0, 0])
    assert torch.all(grad[~mask] == 0)


def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    logprobs, old, ref, advantages, mask, entropy = policy_case((3, 6))

    def objective(lp, ent):
        return pyalign.policy_loss(lp, old, advantages, mask, loss_type="grpo",
                                   importance_sampling_level="sequence", ref_logprobs=ref,
                                   beta=0.04, entropy=ent, entropy_coef=0.01,
                                   top_entropy_quantile=0.5).loss

    def value_and_grads(function):
        lp = logprobs.clone().requires_grad_(True)
        ent = entropy.clone().requires_grad_(True)
        value = function(lp, ent)
        value.backward()
        return value.detach(), lp.grad, ent.grad

    expected = value_and_grads(objective)
    compiled = value_and_grads(torch.compile(objective, fullgraph=True, backend="aot_eager"))
    for a, b in zip(expected, compiled, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_entropy_mask_is_trls_quantile_rule():
    """The graph-friendly quantile (sort + gathers) selects exactly what TRL's torch.quantile
    over the kept entropies selects, ties and empty masks included."""
    from pyalign.ops.policy import _entropy_mask
    for trial in range(200):
        rows, length = torch.randint(1, 6, (2,)).tolist()
        entropy = torch.rand(rows, length) * 2
        if trial % 3 == 0:  # ties
            entropy = torch.randint(0, 4, (rows, length)).float()
        mask = torch.rand(rows, length) > 0.4
        quantile = float(torch.rand(())) * 0.99 + 0.01
        kept = entropy[mask]
        want = (mask & (entropy >= torch.quantile(kept, 1 - quantile)) if kept.numel()
                else torch.zeros_like(mask))
        assert torch.equal(_entropy_mask(entropy, mask, quantile), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_integer_mask_and_non_contiguous(backend):
    """fp32 policy log-probs with bf16 old/reference log-probs and fp16 entropies, a 0/1 int64
    mask and transposed (non-contiguous) inputs."""
    logprobs, old, ref, advantages, mask, entropy = policy_case((7, 4))
    lp_t, old_t, ref_t, ent_t, mask_t = (t.t() for t in (logprobs, old, ref, entropy, mask))
    advantages = torch.randn(4)
    old_b, ref_b, ent_h = old_t.to(torch.bfloat16), ref_t.to(torch.bfloat16), ent_t.to(torch.float16)
    assert not lp_t.is_contiguous()
    options = loss_options("grpo", "sequence", True, True)
    leaf = lp_t.clone().requires_grad_(True)  # clone keeps the transposed strides
    ent_leaf = ent_h.clone().requires_grad_(True)
    out = pyalign.policy_loss(leaf, old_b, advantages, mask_t.to(torch.int64), ref_logprobs=ref_b,
                              entropy=ent_leaf, backend=backend, **options)
    out.loss.backward()
    expected = oracle(lp_t, old_b, ref_b, advantages, mask_t, ent_h, "grpo", options)
    assert leaf.grad.dtype == torch.float32 and ent_leaf.grad.dtype == torch.float16
    check_against_oracle(out, leaf.grad, ent_leaf.grad, expected, dict(rtol=1e-3, atol=1e-5))
