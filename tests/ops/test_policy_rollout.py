"""pyalign.policy_loss's rollout correction (pyalign/losses/rollout.py: ``rollout_logprobs`` with
TRL 1.16's vllm_importance_sampling_* modes, verl's geometric rejection and the off-policy mask)
on every backend against the float64 oracle of tests/support.py and against TRL's own code on the
same tensors; and the zero-slope rule: a clipped branch, an advantage of 0 or a weight of 0
contributes exactly 0 (loss and gradient) where the ratio overflows fp32, on every policy loss
and backend, against the float64 oracle (where the ratio is finite)."""
import math

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
from policy_trl import TRL_GRPO_TYPES, trl_case, trl_grpo

import pyalign
from pyalign import losses
from support import ON_CPU, ROLLOUT_METRICS

# bounds that truncate or mask some units of the cases below (token ratios e^±0.3, row sums of
# ~25 of them, their means e^±0.06); geometric_reject's C_min is 1/C_max when unset
BOUNDS = {"token_truncate": (0.8, 1.3), "token_mask": (0.8, 1.3), "sequence_truncate": (0.5, 2.0),
          "sequence_mask": (None, 2.0), "geometric_reject": (None, 1.04)}
TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def applies(loss_type, mode):
    """vespo takes ρ into its sequence weight per token: token modes only (as TRL)."""
    return not losses.get_policy(loss_type).rollout_in_sequence_weight or mode.startswith("token")


def rollout_options(mode, off_policy):
    clip_min, clip_max = BOUNDS[mode]
    return dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                vllm_importance_sampling_clip_max=clip_max,
                off_policy_mask_threshold=0.05 if off_policy else None)


def sampler_logprobs(old, mask):
    """The sampler's log-probs: near the old ones, NaN on one kept token (not scored: no
    correction there, as TRL) and wherever masked."""
    rollout = old + torch.randn(old.shape, dtype=old.dtype) * 0.3
    rows, cols = mask.nonzero(as_tuple=True)
    rollout[rows[1], cols[1]] = math.nan
    return torch.where(mask, rollout, math.nan)


# The modes differ only in the torch code every backend shares (losses.rollout_terms); a kernel
# backend sees a weight ω per token, or vespo's sequence log-weight: there, every mode on grpo and
# one mode on each other kernel path.
ONE_MODE = {"rloo": "sequence_mask", "cispo": "token_truncate", "sapo": "sequence_truncate",
            "vespo": "token_mask"}


def modes_on(backend, loss_type):
    if backend == "eager" or loss_type == "grpo":
        return [mode for mode in losses.ROLLOUT_MODES if applies(loss_type, mode)]
    return [ONE_MODE[loss_type]]


CASES = [(b, lt, mode) for b in BACKENDS for lt in losses_on(b) for mode in modes_on(b, lt)]


@pytest.mark.parametrize("backend,loss_type,mode", CASES, ids=["-".join(c) for c in CASES])
def test_rollout_correction_matches_float64(backend, loss_type, mode):
    shape = (3, 7) if backend == "triton" and ON_CPU else (5, 37)
    logprobs, old, ref, advantages, mask, entropy = policy_case(shape)
    rollout = sampler_logprobs(old, mask)
    for index, level in enumerate(levels_of(loss_type)):
        options = dict(loss_options(loss_type, level, True, index == 0), rollout_logprobs=rollout,
                       **rollout_options(mode, off_policy=index == 0))
        entropy_in = entropy if index == 0 else None
        out, grad, grad_entropy = run(backend, logprobs, old, ref, advantages, mask, entropy_in,
                                      **options)
        expected = oracle(logprobs, old, ref, advantages, mask, entropy_in, loss_type, options)
        check_against_oracle(out, grad, grad_entropy, expected, FP32)
        assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", losses.ROLLOUT_MODES)
def test_sampler_equal_to_old_policy_changes_nothing(backend, mode):
    """rollout_logprobs equal to the old log-probs: ρ = 1 (inside every mode's bounds), so the
    loss and gradient are bitwise those without the correction; the metrics say so."""
    logprobs, old, ref, advantages, mask, entropy = policy_case((4, 9))
    options = dict(loss_options("grpo", "token", True, False), **rollout_options(mode, False))
    plain, grad_plain, _ = run(backend, logprobs, old, ref, advantages, mask, None,
                               **loss_options("grpo", "token", True, False))
    corrected, grad, _ = run(backend, logprobs, old, ref, advantages, mask, None,
                             rollout_logprobs=old.clone(), **options)
    assert torch.equal(corrected.loss, plain.loss) and torch.equal(grad, grad_plain)
    assert corrected.importance_sampling_ratio_min == corrected.importance_sampling_ratio_max == 1
    assert corrected.importance_sampling_masked_fraction == 0
    assert corrected.sampling_logp_difference_max == 0
    for name in ROLLOUT_METRICS:
        assert torch.isnan(getattr(plain, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_correction_off_keeps_only_the_off_policy_mask(backend):
    """vllm_importance_sampling_correction=False: no ρ, no rollout metrics; the off-policy mask
    still reads the sampler's log-probs (TRL's sampling_per_token_logps)."""
    logprobs, old, ref, advantages, mask, _ = policy_case((4, 9))
    rollout = sampler_logprobs(old, mask)
    options = dict(loss_options("dapo", "token", False, False), rollout_logprobs=rollout,
                   vllm_importance_sampling_correction=False, off_policy_mask_threshold=0.05)
    out, grad, _ = run(backend, logprobs, old, None, advantages, mask, None, **options)
    check_against_oracle(out, grad, None, oracle(logprobs, old, None, advantages, mask, None,
                                                 "dapo", options), FP32)
    assert all(torch.isnan(getattr(out, name)) for name in ROLLOUT_METRICS)


TRL_CASES = [(b, lt, mode) for b in BACKENDS for lt in TRL_GRPO_TYPES if lt in losses_on(b)
             for mode in TRL_MODES if mode in modes_on(b, lt)]


@pytest.mark.parametrize("backend,loss_type,mode", TRL_CASES, ids=["-".join(c) for c in TRL_CASES])
def test_rollout_correction_matches_trl(backend, loss_type, mode):
    """TRL 1.16's own code: its vLLM importance-sampling blocks of _generate_and_score_completions
    make the ratio and its metrics, its _compute_loss the loss (the off-policy mask included)."""
    logprobs, old, ref, advantages, mask, entropy = trl_case()
    rollout = old + torch.randn(old.shape, dtype=torch.float64) * 0.3
    if backend != "eager":  # the kernels take fp32: TRL runs on the same fp32-rounded values
        logprobs, old, ref, advantages, entropy, rollout = (
            t.float().double() for t in (logprobs, old, ref, advantages, entropy, rollout))
    for index, level in enumerate(("token", "sequence")):
        options = dict(loss_options(loss_type, level, True, index == 1),
                       **rollout_options(mode, off_policy=index == 0))
        leaf = logprobs.detach().clone().requires_grad_(True)
        ent_leaf = entropy.detach().clone().requires_grad_(True)
        trl_loss, trl_metrics = trl_grpo(
            loss_type, leaf, old, ref, advantages, mask, ent_leaf, beta=options["beta"],
            epsilon_high=options.get("epsilon_high"), delta=options.get("delta"), level=level,
            entropy_coef=options.get("entropy_coef", 0.0),
            top_entropy_quantile=options.get("top_entropy_quantile", 1.0),
            max_completion_length=options["max_completion_length"],
            num_items=options.get("num_items_in_batch"), rollout=rollout, is_mode=mode,
            is_clip_min=BOUNDS[mode][0], is_clip_max=BOUNDS[mode][1],
            off_policy_threshold=options["off_policy_mask_threshold"])
        (trl_grad,) = torch.autograd.grad(trl_loss, [leaf])
        dtype = torch.float64 if backend == "eager" else torch.float32
        ours, grad, _ = run(backend, logprobs, old, ref, advantages, mask, entropy, dtype=dtype,
                            rollout_logprobs=rollout, **options)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else FP32
        if loss_type == "sapo" and dtype == torch.float64:  # TRL rounds sapo's temperatures to fp32
            tol = dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ours.loss.double(), trl_loss.detach(), **tol)
        torch.testing.assert_close(grad.double(), trl_grad, **tol)
        for stat in ("importance_sampling_ratio/mean", "importance_sampling_ratio/min",
                     "importance_sampling_ratio/max", "sampling_logp_difference/mean",
                     "sampling_logp_difference/max"):
            name = stat.replace("/", "_")
            torch.testing.assert_close(getattr(ours, name).double().item(),
                                       trl_metrics[f"sampling/{stat}"], rtol=1e-5, atol=1e-6,
                                       msg=stat)


def test_the_modes_are_declared_once():
    assert losses.ROLLOUT_MODES == tuple(losses.ROLLOUT_CORRECTIONS)
    assert set(TRL_MODES) < set(losses.ROLLOUT_MODES)
    for entry in losses.ROLLOUT_CORRECTIONS.values():
        assert entry.level in ("token", "sequence", "geometric")
        assert entry.bounds in ("truncate", "mask", "reject") and entry.source
    defaults = losses.RolloutOptions()  # TRL 1.16's GRPOConfig defaults
    assert (defaults.correction, defaults.mode, defaults.clip_min, defaults.clip_max,
            defaults.off_policy_mask_threshold) == (True, "sequence_mask", None, 3.0, None)
    import inspect
    signature = inspect.signature(pyalign.policy_loss).parameters
    for name, value in (("vllm_importance_sampling_correction", True),
                        ("vllm_importance_sampling_mode", "sequence_mask"),
                        ("vllm_importance_sampling_clip_max", 3.0),
                        ("vllm_importance_sampling_clip_min", None),
                        ("off_policy_mask_threshold", None)):
        assert signature[name].default == value, name


def _good():
    logprobs = -torch.rand(2, 3)
    return dict(logprobs=logprobs, old_logprobs=logprobs + 0.1, advantages=torch.randn(2),
                mask=torch.ones(2, 3, dtype=torch.bool), rollout_logprobs=logprobs + 0.2)


@pytest.mark.parametrize("change,error,match", [
    (dict(rollout_logprobs=torch.rand(2, 4)), ValueError, "rollout_logprobs has shape"),
    (dict(rollout_logprobs=torch.ones(2, 3, dtype=torch.long)), TypeError, "rollout_logprobs"),
    (dict(vllm_importance_sampling_mode="token"), ValueError, "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_clip_max=0.0), ValueError, "vllm_importance_sampling_clip_max"),
    (dict(vllm_importance_sampling_clip_max=math.inf), ValueError, "clip_max"),
    (dict(vllm_importance_sampling_clip_min=-1.0), ValueError, "vllm_importance_sampling_clip_min"),
    (dict(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.5),
     ValueError, "must be less than"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     ValueError, "needs vllm_importance_sampling_clip_min or"),
    (dict(vllm_importance_sampling_correction=1), TypeError, "vllm_importance_sampling_correction"),
    (dict(off_policy_mask_threshold=math.nan), ValueError, "off_policy_mask_threshold"),
    (dict(loss_type="vespo"), ValueError, "token_truncate or token_mask"),
])
def test_bad_rollout_input_is_a_clear_error(change, error, match):
    kwargs = {**_good(), **change}
    positional = [kwargs.pop(name) for name in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(error, match=match):
        pyalign.policy_loss(*positional, **kwargs)


# ------------------------------------------------------- a zero slope where the ratio overflows

@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_example_gives_zero_not_nan(backend):
    """A ratio of e^99.9 (inf in fp32) on a token whose branch is clipped (δ = 3, A < 0): its
    gradient is 0 (float64: 0), not NaN; at A = 0 the loss is 0 and the gradient 0."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[-100.0, -0.2]])
    lp = torch.tensor([[-0.1, -0.2]], requires_grad=True)
    pyalign.policy_loss(lp, old, torch.tensor([-1.0]), mask, delta=3.0,
                        backend=backend).loss.backward()
    assert torch.equal(lp.grad, torch.tensor([[0.0, 0.5]]))
    lp = torch.tensor([[-0.1, -0.2]], requires_grad=True)
    out = pyalign.policy_loss(lp, old, torch.tensor([0.0]), mask, backend=backend)
    out.loss.backward()
    assert out.loss == 0 and torch.equal(lp.grad, torch.zeros(1, 2))


def overflow_case(loss_type, level):
    """policy_case with ratios of e^100 (inf in fp32, finite in float64) on whole rows, where
    every policy term has zero slope in w: rows 0-1 with A > 0 (the PPO clip takes the clipped
    branch; δ clips A < 0 too), row 2 with A = 0; sapo saturates, cispo caps, vespo clamps. The
    reference equals the policy there (kl = 0: the bias-corrected KL term kl·w is 0 too)."""
    logprobs, old, ref, advantages, mask, entropy = policy_case((4, 9), all_masked_row=False)
    advantages[:2], advantages[2] = advantages[:2].abs() + 0.1, 0.0
    far = torch.zeros_like(mask)
    far[:3] = mask[:3]
    shift = 100.0 if level in ("token", "sequence") else 100.0 / mask.sum(-1, keepdim=True)
    old = torch.where(far, logprobs - shift, old)
    ref = torch.where(far, logprobs, ref)
    return logprobs, old, ref, advantages, mask, entropy


OVERFLOW = [(b, lt, lv) for b in BACKENDS for lt in losses_on(b) for lv in levels_of(lt)]


@pytest.mark.parametrize("backend,loss_type,level", OVERFLOW, ids=[f"{b}-{lt}-{lv}"
                                                                   for b, lt, lv in OVERFLOW])
def test_zero_slope_where_the_ratio_overflows_matches_float64(backend, loss_type, level):
    logprobs, old, ref, advantages, mask, entropy = overflow_case(loss_type, level or "sum")
    options = loss_options(loss_type, level, True, True)
    if losses.get_policy(loss_type).clip_metric == "ppo":
        options["delta"] = 1.5
    out, grad, grad_entropy = run(backend, logprobs, old, ref, advantages, mask, entropy, **options)
    loss64, metrics64, grad64, grad_entropy64 = oracle(logprobs, old, ref, advantages, mask,
                                                       entropy, loss_type, options)
    assert torch.isfinite(grad).all() and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), loss64, **FP32)
    torch.testing.assert_close(grad.double(), grad64, **FP32)
    torch.testing.assert_close(grad_entropy.double(), grad_entropy64, **FP32)
    for name in ("policy_loss", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                 "mean_kl"):
        torch.testing.assert_close(getattr(out, name).double(), metrics64[name], **FP32)
    assert out.mean_ratio == math.inf  # e^100 overflows fp32: the metric says so


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_rollout_weight_silences_an_infinite_term(backend):
    """dapo with A < 0 and no δ: the term of a ratio of e^100 is +inf in fp32 (and ~1e43 in
    float64); a row the sequence mask rejects (ρ = 0) contributes exactly 0 all the same."""
    logprobs, old, ref, advantages, mask, _ = policy_case((3, 6), all_masked_row=False)
    advantages[0] = -1.0
    old[0] = torch.where(mask[0], logprobs[0] - 100.0, old[0])
    rollout = old.clone()
    rollout[0] = torch.where(mask[0], old[0] - 5.0, old[0])  # row 0's ρ = e^(5·n) > C_max
    options = dict(loss_options("dapo", "token", False, False), rollout_logprobs=rollout)
    out, grad, _ = run(backend, logprobs, old, None, advantages, mask, None, **options)
    expected = oracle(logprobs, old, None, advantages, mask, None, "dapo", options)
    assert out.importance_sampling_masked_fraction > 0
    loss64, metrics64, grad64, _ = expected
    metrics64["mean_ratio"] = out.mean_ratio.double()  # inf in fp32, ~1e43 in float64
    check_against_oracle(out, grad, None, (loss64, metrics64, grad64, None), FP32)


def test_fullgraph_compile_with_the_rollout_correction_matches_eager():
    torch._dynamo.reset()
    logprobs, old, ref, advantages, mask, _ = policy_case((3, 6))
    rollout = sampler_logprobs(old, mask)

    def objective(lp):
        out = pyalign.policy_loss(lp, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                                  beta=0.04, rollout_logprobs=rollout,
                                  vllm_importance_sampling_mode="token_mask",
                                  vllm_importance_sampling_clip_min=0.8,
                                  vllm_importance_sampling_clip_max=1.3,
                                  off_policy_mask_threshold=0.05)
        return out.loss, out.importance_sampling_ratio_mean

    def value_and_grad(function):
        lp = logprobs.clone().requires_grad_(True)
        loss, metric = function(lp)
        loss.backward()
        return loss.detach(), metric, lp.grad

    try:
        expected = value_and_grad(objective)
        compiled = value_and_grad(torch.compile(objective, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(expected, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)], ids=["no-rows", "no-tokens"])
def test_empty_batches(backend, shape):
    """No rows or no tokens: loss 0, zero gradients, and TRL's metrics of nothing (0), or, per
    sequence, of the rows' ratio exp(0) = 1."""
    for mode in ("token_mask", "sequence_mask"):
        logprobs = torch.empty(shape, requires_grad=True)
        mask = torch.empty(shape, dtype=torch.bool)
        out = pyalign.policy_loss(logprobs, None, torch.ones(shape[0]), mask,
                                  rollout_logprobs=torch.empty(shape), backend=backend,
                                  vllm_importance_sampling_mode=mode, off_policy_mask_threshold=0.1)
        out.loss.backward()
        assert out.loss == 0 and logprobs.grad.shape == shape
        ratio = 1.0 if mode == "sequence_mask" and shape[0] else 0.0
        assert out.importance_sampling_ratio_mean == out.importance_sampling_ratio_max == ratio
        assert out.sampling_logp_difference_max == 0 and out.importance_sampling_masked_fraction == 0
