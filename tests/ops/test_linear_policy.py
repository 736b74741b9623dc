"""pyalign.linear_policy_loss: the policy losses from the last hidden state. Its 3-matmul path
(pyalign/ops/_fused_head.py) against the float64 oracle (float64 logits hidden·Wᵀ + b, the
float64 log-probs and entropies of tests/support.py, then policy64) and against the recompute
path (linear_token_logprobs then policy_loss, to 1e-5 in fp32): the loss, the metrics and the
gradients of hidden, weight and bias, for every registry loss, token and sequence ratios, KL and
entropy bonus on and off (the bonus's gradient goes through the head), per-token advantages,
top_entropy_quantile < 1 (the recompute path), the rollout correction (rollout_logprobs), ratios
that overflow fp32 where the policy term has zero slope, bf16, several chunks, masked and
all-masked rows, B = 1; which path runs and its matmul count; bad input."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pyalign
from pyalign import losses
from pyalign.ops import linear_policy
from support import (
    DEVICE,
    IGNORE,
    ON_CPU,
    ROLLOUT_METRICS,
    backends_for,
    entropy64,
    linear_logits64,
    policy64,
    token_logprobs64,
)

BACKENDS = backends_for("linear_logprobs")
METRICS = ("policy_loss", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "mean_kl",
           "mean_entropy", "mean_ratio") + ROLLOUT_METRICS
FP32 = dict(rtol=1e-5, atol=1e-6)
MAX_LENGTH = 9  # dr_grpo's max_completion_length


def levels_of(loss_type):
    return [None] if loss_type == "rloo" else ["token", "sequence"]


def head_case(rows=4, seq_len=7, hidden_size=8, vocab=37, dtype=torch.float32, per_token_adv=False,
              seed=0):
    """Hidden states (scaled so the ratios straddle the clip range), head, bias, labels with a
    masked first position, a padded row and (rows > 3) an all-masked row; old and reference
    per-token log-probs near the policy's; advantages. V = 37: not a multiple of any block."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq_len, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / 2
    bias = torch.randn(vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    labels[:, 0] = IGNORE
    labels[0, 1], labels[0, 2] = 0, vocab - 1
    if rows > 1:
        labels[1, seq_len - 3:] = IGNORE
    if rows > 3:
        labels[3] = IGNORE
    with torch.no_grad():
        policy = token_logprobs64(linear_logits64(hidden, weight, bias), labels).float()
    old = policy + 0.3 * torch.randn(policy.shape, generator=generator)
    ref = policy + 0.5 * torch.randn(policy.shape, generator=generator)
    advantages = torch.randn((rows, seq_len) if per_token_adv else (rows,), generator=generator)
    move = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return (move(hidden), move(weight), move(bias), labels.to(DEVICE), old.to(DEVICE),
            ref.to(DEVICE), advantages.to(DEVICE))


def options_of(loss_type, level, with_kl, entropy_coef, **extra):
    options = dict(loss_type=loss_type, beta=0.04 if with_kl else 0.0, entropy_coef=entropy_coef,
                   **extra)
    if level is not None:
        options["importance_sampling_level"] = level
    if losses.get_policy(loss_type).normalisation == "max_length":
        options["max_completion_length"] = MAX_LENGTH
    return options


def run_fused(hidden, weight, bias, labels, advantages, old, ref, upstream=1.0, **kwargs):
    """(output, grads of hidden, weight, bias) of linear_policy_loss."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = pyalign.linear_policy_loss(leaves[0], leaves[1], labels, advantages, old, ref,
                                     bias=leaves[2], **kwargs)
    (out.loss * upstream).backward()
    return out, [t.grad for t in leaves]


def run_recompute(hidden, weight, bias, labels, advantages, old, ref, chunk_size=None,
                  backend="auto", rollout_logprobs=None, **options):
    """The same loss through the per-token ops: linear_token_logprobs (with entropy), policy_loss."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    token_logps, entropy = pyalign.linear_token_logprobs(
        leaves[0], leaves[1], labels, bias=leaves[2], entropy=True, chunk_size=chunk_size,
        backend=backend)
    loss_backend = backend if backend in backends_for("policy") else "auto"
    out = pyalign.policy_loss(token_logps, old, advantages, labels != IGNORE, ref_logprobs=ref,
                              rollout_logprobs=rollout_logprobs, entropy=entropy,
                              backend=loss_backend, **options)
    out.loss.backward()
    return out, [t.grad for t in leaves]


def oracle(hidden, weight, bias, labels, advantages, old, ref, *, loss_type, beta=0.0,
           entropy_coef=0.0, importance_sampling_level=None, top_entropy_quantile=1.0,
           max_completion_length=None, delta=None, rollout_logprobs=None,
           vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
           vllm_importance_sampling_clip_max=3.0, off_policy_mask_threshold=None):
    """policy64 on float64 log-probs and entropies of the float64 head; gradients by autograd."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (hidden, weight, bias)]
    labels = labels.cpu()
    logits = linear_logits64(*leaves)
    logprobs, entropy = token_logprobs64(logits, labels), entropy64(logits, labels)
    loss, metrics = policy64(
        logprobs, logprobs.detach() if old is None else old.cpu(), advantages.cpu(),
        labels != IGNORE, loss_type, ref_logprobs=None if ref is None else ref.cpu(), beta=beta,
        level=importance_sampling_level or "token", entropy=entropy, entropy_coef=entropy_coef,
        top_entropy_quantile=top_entropy_quantile, max_completion_length=max_completion_length,
        delta=delta, rollout_logprobs=None if rollout_logprobs is None else rollout_logprobs.cpu(),
        is_mode=vllm_importance_sampling_mode, is_clip_min=vllm_importance_sampling_clip_min,
        is_clip_max=vllm_importance_sampling_clip_max,
        off_policy_threshold=off_policy_mask_threshold)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), metrics, grads


def assert_matches(out, grads, expected, tol):
    """``expected``: an oracle tuple (loss, metrics dict, grads) or a (PolicyLossOutput, grads)."""
    if isinstance(expected[1], dict):
        loss, metrics, want_grads = expected
    else:
        loss, metrics, want_grads = expected[0].loss, expected[0]._asdict(), expected[1]
    torch.testing.assert_close(out.loss.detach().double().cpu(), loss.double().cpu(), **tol)
    for name in METRICS:
        value, want = getattr(out, name), metrics[name]
        assert not value.requires_grad, name
        if math.isnan(float(want)):
            assert torch.isnan(value), name
        else:
            torch.testing.assert_close(value.double().cpu(), want.double().cpu(), **tol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    for grad, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad.double().cpu(), want.double().cpu(), **tol)


# ---------------------------------------------------------- every loss, both ratio levels

MATRIX = [(lt, level, kl, ent) for lt in losses.POLICY_NAMES for level in levels_of(lt)
          for kl in (False, True) for ent in (0.0, 0.3)]


@pytest.mark.parametrize("loss_type,level,with_kl,entropy_coef", MATRIX,
                         ids=[f"{lt}-{lv}-{'kl' if k else 'nokl'}-{'ent' if e else 'noent'}"
                              for lt, lv, k, e in MATRIX])
def test_every_loss_matches_float64_and_the_recompute_path(loss_type, level, with_kl,
                                                            entropy_coef):
    """chunk_size=5: several chunks (whole sequences: each chunk holds one or two rows)."""
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    options = options_of(loss_type, level, with_kl, entropy_coef)
    fused = run_fused(hidden, weight, bias, labels, advantages, old, ref, chunk_size=5, **options)
    assert_matches(*fused, oracle(hidden, weight, bias, labels, advantages, old, ref, **options),
                   FP32)
    assert_matches(*fused, run_recompute(hidden, weight, bias, labels, advantages, old, ref,
                                         chunk_size=5, **options), FP32)


# ------------------------------------------------------------ every backend, every option

CASES = {
    "grpo-kl-entropy": dict(options=dict(loss_type="grpo", beta=0.04, entropy_coef=0.1)),
    "dapo-sequence-per-token-adv": dict(per_token_adv=True, options=dict(
        loss_type="dapo", importance_sampling_level="sequence", entropy_coef=0.2)),
    "bnpo-on-policy": dict(on_policy=True, options=dict(loss_type="bnpo", beta=0.1)),
    "top-entropy-quantile": dict(options=dict(loss_type="grpo", top_entropy_quantile=0.5,
                                              entropy_coef=0.1, beta=0.04)),
    "one-sequence": dict(rows=1, options=dict(loss_type="dr_grpo", entropy_coef=0.1,
                                              max_completion_length=MAX_LENGTH)),
    "rollout-token-mask-off-policy-mask": dict(rollout=True, options=dict(
        loss_type="grpo", beta=0.04, entropy_coef=0.1, vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=1.3,
        off_policy_mask_threshold=0.05)),
    "rollout-sequence-mask-on-policy": dict(rollout=True, on_policy=True, options=dict(
        loss_type="dapo", vllm_importance_sampling_clip_max=1.5)),
    "rollout-vespo-token-truncate": dict(rollout=True, options=dict(
        loss_type="vespo", vllm_importance_sampling_mode="token_truncate")),
    "rollout-geometric-reject-top-entropy": dict(rollout=True, options=dict(
        loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.5,
        entropy_coef=0.1, vllm_importance_sampling_mode="geometric_reject",
        vllm_importance_sampling_clip_max=1.1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backends_match_float64_and_the_recompute_path(backend, case):
    spec = CASES[case]
    hidden, weight, bias, labels, old, ref, advantages = head_case(
        rows=spec.get("rows", 4), per_token_adv=spec.get("per_token_adv", False))
    options = dict(spec["options"])
    if spec.get("rollout"):  # the sampler's log-probs, near the old policy's
        options["rollout_logprobs"] = old + 0.3 * torch.randn(old.shape, dtype=old.dtype)
    old = None if spec.get("on_policy") else old
    fused = run_fused(hidden, weight, bias, labels, advantages, old, ref, chunk_size=4,
                      backend=backend, **options)
    assert_matches(*fused, oracle(hidden, weight, bias, labels, advantages, old, ref, **options),
                   FP32)
    assert_matches(*fused, run_recompute(hidden, weight, bias, labels, advantages, old, ref,
                                         chunk_size=4, backend=backend, **options), FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_matches_float64_loosely(backend):
    hidden, weight, bias, labels, old, ref, advantages = head_case(dtype=torch.bfloat16)
    options = dict(loss_type="grpo", beta=0.04, entropy_coef=0.1)
    out, grads = run_fused(hidden, weight, bias, labels, advantages, old, ref, backend=backend,
                           **options)
    assert all(grad.dtype == torch.bfloat16 for grad in grads)
    assert_matches(out, grads, oracle(hidden, weight, bias, labels, advantages, old, ref, **options),
                   dict(rtol=2e-2, atol=2e-2))


def test_all_masked_batch_gives_zero_and_zero_gradients():
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    labels = torch.full_like(labels, IGNORE)
    out, grads = run_fused(hidden, weight, bias, labels, advantages, old, ref, beta=0.04,
                           entropy_coef=0.1)
    assert out.loss.item() == 0.0 and out.policy_loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_masked_positions_are_never_read():
    """NaN in the hidden states, old and reference log-probs of masked positions is inert."""
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    options = dict(loss_type="grpo", beta=0.04, entropy_coef=0.1)
    clean = run_fused(hidden, weight, bias, labels, advantages, old, ref, **options)
    masked = labels == IGNORE
    for tensor in (old, ref):
        tensor[masked] = math.nan
    hidden[masked] = math.nan
    poisoned = run_fused(hidden, weight, bias, labels, advantages, old, ref, **options)
    grads = list(poisoned[1])
    assert torch.equal(grads[0][masked], torch.zeros_like(grads[0][masked]))
    grads[0] = torch.where(masked[..., None], clean[1][0], grads[0])
    assert_matches(poisoned[0], grads, clean, dict(rtol=0, atol=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_have_probability_zero(backend):
    """A vocabulary entry masked by a -inf bias: probability 0, its entropy term 0, zero and
    finite gradients (the oracle takes a float64 floor whose exp underflows to 0 instead)."""
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    masked_entry = 5
    labels = torch.where(labels == masked_entry, masked_entry + 1, labels)
    bias[masked_entry] = -math.inf
    options = dict(loss_type="grpo", beta=0.04, entropy_coef=0.3)
    out, grads = run_fused(hidden, weight, bias, labels, advantages, old, ref, chunk_size=4,
                           backend=backend, **options)
    assert grads[2][masked_entry] == 0 and torch.equal(grads[1][masked_entry],
                                                       torch.zeros_like(grads[1][masked_entry]))
    floored = bias.double()
    floored[masked_entry] = torch.finfo(torch.float64).min / 4
    assert_matches(out, grads, oracle(hidden, weight, floored, labels, advantages, old, ref,
                                      **options), FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"),
                                             ("sapo", "token"), ("cispo", "token"),
                                             ("rloo", None)])
def test_zero_slope_where_the_ratio_overflows(backend, loss_type, level):
    """Old log-probs 100 nats below the policy's on rows 0 and 2 (ratio inf in fp32): row 0 with
    A > 0 (its branch clipped), row 2 with A = 0: every gradient finite and the float64
    oracle's, where w = e^100 is finite."""
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    with torch.no_grad():
        policy = token_logprobs64(linear_logits64(hidden.cpu(), weight.cpu(), bias.cpu()),
                                  labels.cpu()).float().to(DEVICE)
    far = torch.zeros_like(labels, dtype=torch.bool)
    far[[0, 2]] = labels[[0, 2]] != IGNORE
    shift = 100.0 if level is not None else 100.0 / far.sum(-1, keepdim=True).clamp(min=1)
    old = torch.where(far, policy - shift, old)
    advantages[0], advantages[2] = advantages[0].abs() + 0.1, 0.0
    # no KL term: the bias-corrected kl·w is inf there unless kl is exactly 0, which the head's
    # fp32 log-probs do not promise (tests/ops/test_policy_rollout.py checks kl = 0)
    options = options_of(loss_type, level, False, 0.1)
    if losses.get_policy(loss_type).clip_metric == "ppo":
        options["delta"] = 1.5
    out, grads = run_fused(hidden, weight, bias, labels, advantages, old, None, chunk_size=5,
                           backend=backend, **options)
    assert all(torch.isfinite(grad).all() for grad in grads) and torch.isfinite(out.loss)
    loss64, metrics64, grads64 = oracle(hidden, weight, bias, labels, advantages, old, None,
                                        **options)
    metrics64["mean_ratio"] = out.mean_ratio.double()  # inf in fp32
    assert out.mean_ratio == math.inf
    # the fp32 log-probs of the head round differently from the float64 ones the shift used
    assert_matches(out, grads, (loss64, metrics64, grads64), dict(rtol=1e-4, atol=1e-5))


def test_upstream_gradient_scales_the_stored_gradients():
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    once = run_fused(hidden, weight, bias, labels, advantages, old, ref, beta=0.04)
    scaled = run_fused(hidden, weight, bias, labels, advantages, old, ref, beta=0.04, upstream=-2.5)
    for grad, base in zip(scaled[1], once[1], strict=True):
        torch.testing.assert_close(grad, -2.5 * base, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- which path, its cost

def _refuse(*args, **kwargs):
    raise AssertionError("called linear_token_logprobs")


@pytest.mark.parametrize("change,fused", [
    (dict(), True),
    (dict(top_entropy_quantile=0.5), False),
    (dict(softcap=30.0), False),
    (dict(logit_scale=0.5), False),
])
def test_which_path_runs(monkeypatch, change, fused):
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    monkeypatch.setattr(linear_policy, "linear_token_logprobs", _refuse)
    call = lambda: run_fused(hidden, weight, bias, labels, advantages, old, ref,  # noqa: E731
                             entropy_coef=0.1, **change)
    if fused:
        call()
    else:
        with pytest.raises(AssertionError, match="called linear_token_logprobs"):
            call()
    with torch.no_grad(), pytest.raises(AssertionError, match="called linear_token_logprobs"):
        pyalign.linear_policy_loss(hidden, weight, labels, advantages, old, bias=bias)


def test_softcap_and_logit_scale_take_the_head_options():
    """The recompute path's head options reach linear_token_logprobs: the loss changes."""
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    plain = run_fused(hidden, weight, bias, labels, advantages, old, ref)[0].loss
    for change in (dict(softcap=1.0), dict(logit_scale=3.0)):
        other = run_fused(hidden, weight, bias, labels, advantages, old, ref, **change)[0].loss
        assert abs(other.item() - plain.item()) > 1e-4, change


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def test_three_matmuls_on_the_kept_tokens_only():
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    kept = int((labels != IGNORE).sum())
    one_matmul = 2 * kept * hidden.shape[-1] * weight.shape[0]
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter:
        run_fused(hidden, weight, bias, labels, advantages, old, ref, chunk_size=5,
                  entropy_coef=0.1)
    assert counter.get_total_flops() == 3 * one_matmul


@pytest.mark.skipif(not ON_CPU, reason="CPU only: aot_eager tracing is device-independent")
def test_compiled_call_takes_the_recompute_path_with_the_same_numbers():
    hidden, weight, bias, labels, old, ref, advantages = head_case()
    options = dict(beta=0.04, entropy_coef=0.1)
    fused = run_fused(hidden, weight, bias, labels, advantages, old, ref, **options)

    def objective(h, w):
        return pyalign.linear_policy_loss(h, w, labels, advantages, old, ref, bias=bias,
                                          **options).loss

    torch._dynamo.reset()
    try:
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        value = torch.compile(objective, fullgraph=True, backend="aot_eager")(*leaves)
        value.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(value.detach(), fused[0].loss.detach(), **FP32)
    for leaf, grad in zip(leaves, fused[1][:2], strict=True):
        torch.testing.assert_close(leaf.grad, grad, **FP32)


# ------------------------------------------------------------------------------ bad input

def _good():
    hidden, weight, bias, labels, old, ref, advantages = head_case(rows=2, seq_len=3, vocab=5)
    return dict(hidden=hidden.requires_grad_(True), weight=weight, labels=labels,
                advantages=advantages, old_logps=old, ref_logps=ref, bias=bias)


@pytest.mark.parametrize("change,error,match", [
    (dict(hidden=torch.randn(2, 3)), ValueError, "hidden must be \\[B, T, H\\]"),
    (dict(hidden=torch.ones(2, 3, 8, dtype=torch.long)), TypeError, "hidden must be a floating"),
    (dict(weight=torch.randn(5, 7)), ValueError, "weight must be \\[V, H\\]"),
    (dict(weight=torch.randn(5, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias has shape"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels has shape"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer"),
    (dict(labels=torch.full((2, 3), 5)), ValueError, "label"),
    (dict(advantages=torch.randn(3)), ValueError, "advantages has shape"),
    (dict(old_logps=torch.rand(2, 4)), ValueError, "old_logps has shape"),
    (dict(ref_logps=torch.rand(2)), ValueError, "ref_logps has shape"),
    (dict(rollout_logprobs=torch.rand(2, 4)), ValueError, "rollout_logprobs has shape"),
    (dict(rollout_logprobs=torch.rand(2, 3), vllm_importance_sampling_mode="tis"), ValueError,
     "vllm_importance_sampling_mode"),
    (dict(ref_logps=None, beta=0.1), ValueError, "beta > 0 needs ref_logps"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(top_entropy_quantile=0.0), ValueError, "top_entropy_quantile"),
    (dict(entropy=torch.rand(2, 3)), TypeError, "unknown option"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    kwargs = {**_good(), **change}
    positional = [kwargs.pop(name) for name in ("hidden", "weight", "labels", "advantages")]
    with pytest.raises(error, match=match):
        pyalign.linear_policy_loss(*positional, **kwargs)
