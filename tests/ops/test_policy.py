"""pyalign.policy_loss (every policy loss_type of the registry) on every backend of the test device
(support.backends_for) against the float64 oracle of tests/support.py: the loss, the metrics and
the per-token gradients, token and sequence level, KL and entropy terms on and off, NaN in masked
positions, an all-masked row, B = 1 and odd T, ratios far outside the clip range, fp32 and bf16;
each registry entry's hand-derived gradient against autograd of its forward; TRL 1.16's own loss
code (its _compute_loss source) on the same tensors; bad input."""
import inspect

import pytest
import torch
from policy_cases import (
    BACKENDS,
    FP32,
    check_against_oracle,
    levels_of,
    loss_options,
    losses_on,
    oracle,
    policy_case,
    run,
)
from policy_trl import TRL_GRPO_TYPES, trl_case, trl_dir, trl_functions, trl_grpo, trl_rloo

import pyalign
from pyalign import losses
from support import ON_CPU, same_under_thread_counts

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
    trl_dir()  # skips without TRL
    assert importlib.metadata.version("trl").startswith("1.16")
    source = (trl_dir() / "grpo_trainer.py").read_text()
    for name in TRL_GRPO_TYPES:
        assert f'"{name}"' in source, name
    assert inspect.isfunction(trl_functions(trl_dir() / "grpo_trainer.py", ("_compute_loss",))[
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
