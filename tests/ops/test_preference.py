"""pyalign.preference_loss (every loss name of pyalign.losses.PAIRWISE_NAMES) and
linear_preference_loss against float64 (KTO: tests/ops/test_kto.py): the loss table of
docs/algorithms.md (the oracle in tests/support.py) for values, autograd through it for
gradients, on every backend of the test device (support.backends_for). Also: a full Triton block
and a partial one, bf16 inputs with extreme margins, every backend against eager, and the fused
sequence-reduce + loss path (all losses, per-token or precomputed reference, sum or mean, a row
without completion tokens, sequences longer than a Triton block)."""
import math

import pytest
import torch

import pyalign
from pyalign import losses
from support import (
    COMPOSITE_LOSSES,
    IGNORE,
    PAIR_LOSS_FORMULAS,
    backends_for,
    grad_of,
    grads64,
    linear_logits64,
    pairwise_loss_kinds,
    preference64,
    random_lengths,
    random_pairs,
    sequence_logprobs64,
    token_logprobs64,
    token_preference64,
)

BACKENDS = backends_for("preference")
# linear_preference_loss names a backend for its per-token part; the loss part falls back to auto.
LINEAR_BACKENDS = backends_for("linear_logprobs")
SMOOTHED = list(losses.LABEL_SMOOTHING_NAMES)  # the registry entries that use label smoothing
ELEMENTWISE = list(losses.ELEMENTWISE_NAMES)  # per pair a function of that pair alone
EXO_DEFAULT_EPS = 1e-3  # TRL's substitute for exo_pair's label_smoothing = 0


def test_the_oracle_covers_exactly_the_package_losses():
    assert len(losses.PAIRWISE_NAMES) == len(set(losses.PAIRWISE_NAMES)) == 18
    assert set(PAIR_LOSS_FORMULAS) == set(ELEMENTWISE)
    assert set(PAIR_LOSS_FORMULAS) | COMPOSITE_LOSSES == set(losses.PAIRWISE_NAMES)
    assert len(SMOOTHED) == 8 and set(SMOOTHED) <= set(losses.PAIRWISE_NAMES)
    assert all(losses.REGISTRY[name].zero_smoothing_substitute in (None, EXO_DEFAULT_EPS)
               for name in losses.PAIRWISE_NAMES)


def oracle_eps(loss, label_smoothing):
    substitutes = losses.REGISTRY[loss].zero_smoothing_substitute is not None
    return EXO_DEFAULT_EPS if substitutes and label_smoothing == 0 else label_smoothing


def lengths_for(loss, pairs):
    """Random completion lengths for a loss (or list) whose registry entry needs them, else {}."""
    names = [loss] if isinstance(loss, str) else loss
    if not any(losses.REGISTRY[name].needs for name in names):
        return {}
    return dict(chosen_lengths=random_lengths(pairs), rejected_lengths=random_lengths(pairs))


def run(inputs, upstream, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = pyalign.preference_loss(*leaves, **kwargs)
    out.loss.backward(upstream)
    return out, [grad_of(leaf) for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_losses_and_grads_match_float64(backend, loss, beta, dtype):
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    check_pairs_against_float64(backend, loss, beta, 0.0, oracle_eps(loss, 0.0), 9, dtype,
                                dict(rtol=1e-5, atol=1e-6), grad_tol)


def check_pairs_against_float64(backend, loss, beta, label_smoothing, oracle_smoothing, pairs,
                                dtype, loss_tol, grad_tol):
    """Per-pair losses (fp32, shape [pairs]) and input gradients (the inputs' dtype) of
    ``pairs`` random pairs against float64 autograd through the oracle formula."""
    inputs = random_pairs(pairs, dtype)
    upstream = torch.randn(pairs)
    lengths = lengths_for(loss, pairs)
    out, grads = run(inputs, upstream, loss=loss, beta=beta, label_smoothing=label_smoothing,
                     reduction="none", backend=backend, **lengths)
    expected, exp_grads = grads64(
        lambda *t: preference64(*t, loss, beta, oracle_smoothing, **lengths), inputs, upstream)
    assert out.loss.dtype == torch.float32 and out.loss.shape == (pairs,)
    torch.testing.assert_close(out.loss.double(), expected, **loss_tol)
    for grad, exp_grad in zip(grads, exp_grads, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), exp_grad, **grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", SMOOTHED)
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_label_smoothing(backend, loss, label_smoothing):
    inputs = random_pairs(7)
    upstream = torch.randn(7)
    lengths = lengths_for(loss, 7)
    out, grads = run(inputs, upstream, loss=loss, beta=0.2, label_smoothing=label_smoothing,
                     reduction="none", backend=backend, **lengths)
    expected, exp_grads = grads64(lambda *t: preference64(*t, loss, 0.2, label_smoothing, **lengths),
                                  inputs, upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, exp_grad in zip(grads, exp_grads, strict=False):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
def test_gradcheck_float64(loss):
    """The eager backend's closed-form gradients, in float64, against finite differences."""
    inputs = [t.double().requires_grad_(True) for t in random_pairs(5)]
    eps = 0.2 if loss in SMOOTHED else 0.0
    lengths = lengths_for(loss, 5)
    assert torch.autograd.gradcheck(
        lambda *t: pyalign.preference_loss(*t, loss=loss, beta=0.3, label_smoothing=eps,
                                           reduction="none", **lengths).loss, inputs)
    values = pyalign.preference_loss(*inputs, loss=loss, beta=0.3, label_smoothing=eps,
                                     reduction="none", **lengths).loss
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, preference64(*inputs, loss, 0.3, oracle_eps(loss, eps),
                                                    **lengths), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "bco_pair"])
def test_reductions_rewards_and_margins(backend, reduction, loss):
    inputs = random_pairs(6)
    beta = 0.25
    upstream = torch.randn(6) if reduction == "none" else torch.tensor(1.7)
    out, grads = run(inputs, upstream, loss=loss, beta=beta, reduction=reduction, backend=backend)
    reduce = {"mean": lambda v: v.mean(), "sum": lambda v: v.sum(), "none": lambda v: v}[reduction]
    expected, exp_grads = grads64(lambda *t: reduce(preference64(*t, loss, beta)), inputs, upstream)
    assert out.loss.shape == expected.shape
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, exp_grad in zip(grads, exp_grads, strict=False):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-6)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (t.double() for t in inputs)
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    for name, value, exp in (("chosen_rewards", out.chosen_rewards, chosen_rewards),
                             ("rejected_rewards", out.rejected_rewards, rejected_rewards),
                             ("margins", out.margins, chosen_rewards - rejected_rewards)):
        assert not value.requires_grad, f"{name} must be detached"
        assert value.shape == (6,), name
        torch.testing.assert_close(value.double(), exp, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    leaves = [torch.empty(0, requires_grad=True) for _ in range(4)]
    out = pyalign.preference_loss(*leaves, backend=backend)
    assert out.loss.shape == () and out.loss == 0
    out.loss.backward()
    assert all(leaf.grad.shape == (0,) for leaf in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ELEMENTWISE)  # aot sorts the batch, sft sums it
def test_nan_pair_stays_in_its_pair(backend, loss):
    inputs = random_pairs(5)
    inputs[0][2] = float("nan")
    out, grads = run(inputs, torch.ones(5), loss=loss, reduction="none", backend=backend)
    others = torch.arange(5) != 2
    assert torch.isnan(out.loss[2])
    expected = preference64(*inputs, loss, 0.1, oracle_eps(loss, 0.0))
    torch.testing.assert_close(out.loss[others].double(), expected[others], rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(grad[others]).all() for grad in grads)


# --------------------------------------------------------------------- linear_preference_loss

def linear_case(pairs=3, tokens=6, hidden_size=8, vocab=37, seed_prompt=2):
    hidden = torch.randn(2 * pairs, tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (2 * pairs, tokens))
    labels[:, :seed_prompt] = IGNORE  # prompt positions
    labels[0, -1] = IGNORE  # padding
    labels[-1, -2:] = IGNORE
    return hidden, weight, labels


def linear_oracle64(hidden, weight, labels, ref_logps, loss, beta, average):
    """TRL's semantics in float64: ipo on summed log-probs divides by the lengths (the mask)."""
    token_logps = token_logprobs64(linear_logits64(hidden, weight), labels)
    return token_preference64(token_logps, ref_logps, labels != IGNORE, [loss], beta,
                              average=average).mean()


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("reference", ["ref_logps", "ref_hidden", "ref_weight"])
def test_linear_preference_loss_matches_float64(backend, loss, average_log_prob, reference):
    hidden, weight, labels = linear_case()
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape)
    ref_weight = weight + 0.1 * torch.randn(weight.shape) if reference == "ref_weight" else weight
    with torch.no_grad():
        ref_token_logps64 = token_logprobs64(linear_logits64(ref_hidden, ref_weight), labels)
        ref_logps64 = sequence_logprobs64(ref_token_logps64, labels != IGNORE, average_log_prob)
    if reference == "ref_logps":
        kwargs = dict(ref_logps=ref_logps64.float())
    else:
        kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)  # the policy's head, or another
    hidden_leaf = hidden.clone().requires_grad_(True)
    weight_leaf = weight.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(hidden_leaf, weight_leaf, labels, loss=loss, beta=0.2,
                                         average_log_prob=average_log_prob, chunk_size=5,
                                         backend=backend, **kwargs)
    out.loss.backward()
    expected, (exp_grad_hidden, exp_grad_weight) = grads64(
        lambda h, w: linear_oracle64(h, w, labels, ref_logps64, loss, 0.2, average_log_prob),
        [hidden, weight])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_leaf.grad.double(), exp_grad_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_leaf.grad.double(), exp_grad_weight, rtol=1e-4, atol=1e-6)
    assert torch.all(hidden_leaf.grad[labels == IGNORE] == 0)
    pairs = hidden.shape[0] // 2
    policy_logps = sequence_logprobs64(token_logprobs64(linear_logits64(hidden, weight), labels),
                                       labels != IGNORE, average_log_prob)
    rewards = 0.2 * (policy_logps - ref_logps64)
    torch.testing.assert_close(out.chosen_rewards.double(), rewards[:pairs], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.double(), rewards[pairs:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_preference_loss_reference_gets_no_gradient(backend):
    hidden, weight, labels = linear_case()
    ref_hidden = (hidden + 0.3 * torch.randn(hidden.shape)).requires_grad_(True)
    ref_weight = (weight + 0.1).requires_grad_(True)
    weight_leaf = weight.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(hidden, weight_leaf, labels, ref_hidden=ref_hidden,
                                         ref_weight=ref_weight, backend=backend)
    out.loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert weight_leaf.grad is not None and torch.isfinite(weight_leaf.grad).all()
    assert not math.isnan(float(out.loss.detach()))


# label smoothing where the loss uses it: 0.1, or the substitute for 0 (exo_pair: 1e-3)
SMOOTHING = {name: losses.REGISTRY[name].zero_smoothing_substitute or 0.1 for name in SMOOTHED}
PAIR_TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_a_full_block_and_a_partial_one(backend, loss, beta):
    """300 pairs: one full Triton block of 256 and a partial one; smoothing where it applies."""
    eps = SMOOTHING.get(loss, 0.0)
    check_pairs_against_float64(backend, loss, beta, eps, eps, 300, torch.float32, PAIR_TOL,
                                PAIR_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
def test_every_backend_matches_eager(backend, loss):
    inputs = random_pairs(40)
    upstream = torch.randn(40)
    eps = SMOOTHING.get(loss, 0.0)
    kwargs = dict(loss=loss, beta=0.5, label_smoothing=eps, reduction="none", **lengths_for(loss, 40))
    out, grads = run(inputs, upstream, backend=backend, **kwargs)
    eager, eager_grads = run(inputs, upstream, backend="eager", **kwargs)
    torch.testing.assert_close(out.loss, eager.loss, **PAIR_TOL)
    for mine, theirs in zip(grads, eager_grads, strict=False):
        torch.testing.assert_close(mine, theirs, **PAIR_TOL)


@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_and_extreme_margins(backend, loss):
    inputs = [t.to(torch.bfloat16) for t in random_pairs(16, scale=300.0)]  # |beta*h| up to ~100
    upstream = torch.randn(16)
    eps = SMOOTHING.get(loss, 0.0)
    lengths = lengths_for(loss, 16)
    out, grads = run(inputs, upstream, loss=loss, beta=0.1, label_smoothing=eps, reduction="none",
                     backend=backend, **lengths)
    expected, exp_grads = grads64(lambda *t: preference64(*t, loss, 0.1, eps, **lengths), inputs,
                                  upstream)
    finite = torch.isfinite(expected)
    assert finite[: len(finite) // 2].any()
    torch.testing.assert_close(out.loss.double()[finite], expected[finite], rtol=1e-4, atol=1e-5)
    for grad, exp_grad in zip(grads, exp_grads, strict=False):
        assert grad.dtype == torch.bfloat16
        ok = torch.isfinite(exp_grad)
        torch.testing.assert_close(grad.double()[ok], exp_grad[ok], rtol=1e-2, atol=1e-6)


def sequence_case(pairs, seq_len, hidden_size=4, vocab=11):
    """hidden [2B, T, H], an lm_head, labels with a prompt, padding and one row (index 4 when
    there are enough rows) without any completion token."""
    hidden = torch.randn(2 * pairs, seq_len, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :2] = IGNORE
    labels[0, -3:] = IGNORE
    labels[min(4, 2 * pairs - 1)] = IGNORE  # no completion tokens: the count clamps to 1
    return hidden, weight, labels


# The head's backend changes the per-token log-probs' source, not the code of a loss: one loss of
# each kind (every loss's pair math runs on every backend in test_losses.py and test_masks.py).
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("loss", pairwise_loss_kinds())
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("ref_per_token", [False, True], ids=["ref_logps", "ref_hidden"])
def test_sequence_reduce_and_every_kind_of_loss(backend, loss, average, ref_per_token):
    hidden, weight, labels = sequence_case(3, 37)
    mask = labels != IGNORE
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape)
    ref_logps64 = sequence_logprobs64(token_logprobs64(linear_logits64(ref_hidden, weight), labels),
                                      mask, average)
    kwargs = (dict(ref_hidden=ref_hidden, ref_weight=weight) if ref_per_token
              else dict(ref_logps=ref_logps64.float()))
    eps = SMOOTHING.get(loss, 0.0)
    beta = 0.1 if average else 0.05
    hidden_leaf = hidden.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(hidden_leaf, weight, labels, loss=loss, beta=beta,
                                         label_smoothing=eps, average_log_prob=average,
                                         reduction="none", backend=backend, **kwargs)
    upstream = torch.randn(3)
    out.loss.backward(upstream)

    def losses_of(h):
        token_logps = token_logprobs64(linear_logits64(h, weight), labels)
        return token_preference64(token_logps, ref_logps64, mask, [loss], beta,
                                  lambda name: oracle_eps(name, eps), average=average)

    expected, (exp_grad_hidden,) = grads64(losses_of, [hidden], upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden_leaf.grad.double(), exp_grad_hidden, rtol=1e-4, atol=1e-6)
    assert torch.all(hidden_leaf.grad[~mask] == 0)
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_ref", [False, True], ids=["ref_seq", "ref_tokens"])
def test_sequences_longer_than_a_block(backend, per_token_ref):
    """T = 1100: the fused sequence reduction loops over three Triton blocks of 512, the last
    partial, forward and backward."""
    token_logps = -torch.rand(2, 1100) * 0.2
    mask = torch.rand(2, 1100) > 0.1
    mask[:, :3] = False  # a prompt
    ref = -torch.rand(2, 1100) * 0.2 if per_token_ref else -torch.rand(2) * 100
    leaf = token_logps.clone().requires_grad_(True)
    out = pyalign.token_preference_loss(leaf, ref, mask, loss="sigmoid", beta=0.01,
                                        backend=backend)
    out.loss.backward()

    def loss_of(token_logps):
        policy = sequence_logprobs64(token_logps, mask)
        reference = sequence_logprobs64(ref, mask) if per_token_ref else ref
        return preference64(policy[:1], policy[1:], reference[:1], reference[1:], "sigmoid",
                            0.01).mean()

    expected, (exp_grad,) = grads64(loss_of, [token_logps])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------- combinations, f-divergences, per-token options

COMBINATIONS = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["aot", "ipo", "sigmoid_norm"], None),
    (["aot_unpaired", "hinge", "exo_pair", "discopop"], [0.3, 0.0, 1.2, 2.0]),
]
COMBINATION_IDS = ["mpo", "aot-ipo-norm", "four"]
F_CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
           ("alpha_divergence", 0.5), ("alpha_divergence", 1.0), ("alpha_divergence", 2.5)]
F_IDS = [f"{name}-{alpha}" for name, alpha in F_CASES]


def eps_for(label_smoothing):
    """The oracle's label smoothing per loss: exo_pair's 1e-3 for 0, as TRL."""
    return lambda name: oracle_eps(name, label_smoothing) if name in SMOOTHED else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combination", COMBINATIONS, ids=COMBINATION_IDS)
@pytest.mark.parametrize("pairs", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_combinations_match_float64(backend, combination, pairs, dtype):
    names, weights = combination
    inputs = random_pairs(pairs, dtype)
    upstream = torch.randn(pairs)
    lengths = lengths_for(names, pairs)
    out, grads = run(inputs, upstream, loss=names, loss_weights=weights, beta=0.3,
                     label_smoothing=0.1, reduction="none", backend=backend, **lengths)

    def combined(*t):
        return sum(weight * preference64(*t, name, 0.3, eps_for(0.1)(name), **lengths)
                   for name, weight in zip(names, weights or [1.0] * len(names)))

    expected, exp_grads = grads64(combined, inputs, upstream)
    assert out.loss.shape == (pairs,)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    grad_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for grad, exp_grad in zip(grads, exp_grads, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), exp_grad, **grad_tol)
    mean = pyalign.preference_loss(*inputs, loss=names, loss_weights=weights, beta=0.3,
                                   label_smoothing=0.1, backend=backend, **lengths).loss
    torch.testing.assert_close(mean.double(), expected.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("f_divergence,alpha", F_CASES, ids=F_IDS)
@pytest.mark.parametrize("loss", list(losses.F_DIVERGENCE_LOSSES))
def test_f_divergences_match_float64(backend, loss, f_divergence, alpha):
    inputs = random_pairs(5, scale=1.0)
    upstream = torch.randn(5)
    lengths = lengths_for(loss, 5)
    eps = oracle_eps(loss, 0.1) if loss in SMOOTHED else 0.0
    out, grads = run(inputs, upstream, loss=loss, beta=0.5, label_smoothing=eps, reduction="none",
                     f_divergence=f_divergence, f_alpha_divergence_coef=alpha, backend=backend,
                     **lengths)
    expected, exp_grads = grads64(
        lambda *t: preference64(*t, loss, 0.5, eps, f_divergence=f_divergence, alpha=alpha,
                                **lengths), inputs, upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, exp_grad in zip(grads, exp_grads, strict=True):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


def test_alpha_divergence_exponent_is_clamped_at_80_as_trl():
    """(alpha - 1) * r > 80: TRL's score stops at expm1(80)/(alpha - 1), with zero gradient."""
    chosen = torch.tensor([100.0, 1.0], requires_grad=True)
    zeros = torch.zeros(2)
    out = pyalign.preference_loss(chosen, zeros, zeros, zeros, loss="hinge", beta=1e-30,
                                  f_divergence="alpha_divergence", f_alpha_divergence_coef=2.0,
                                  reduction="none")
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all()
    assert chosen.grad[0] == 0 and chosen.grad[1] != 0


def token_inputs(pairs, tokens, dtype=torch.float32, per_token_ref=True):
    """Per-token log-probs [2B, T] with NaN off the completion (selected away, never used), a
    mask with a prompt, padding and an all-masked rejected row, the reference and log sum p^2."""
    mask = torch.ones(2 * pairs, tokens, dtype=torch.bool)
    mask[:, :2] = False
    mask &= torch.arange(tokens) < torch.randint(3, tokens + 1, (2 * pairs, 1))
    if pairs > 1:
        mask[pairs + 1] = False
    clean = -3 * torch.rand(2 * pairs, tokens)
    policy = torch.where(mask, clean, float("nan")).to(dtype)
    ref_clean = clean + 0.4 * torch.randn(2 * pairs, tokens)
    ref = torch.where(mask, ref_clean, float("nan")) if per_token_ref else \
        torch.where(mask, ref_clean, 0.0).sum(-1)
    log_sum_sq = torch.where(mask, -0.5 - torch.rand(2 * pairs, tokens), float("nan"))
    return policy, ref.to(dtype), mask, log_sum_sq


TOKEN_CASES = [
    (["sigmoid"], None, None, False), (["ipo"], None, 0.5, False),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], None, True),
    (["aot", "sigmoid_norm"], None, 0.0, False), (["sft", "apo_down", "ipo"], [1.0, 0.5, 2.0], 0.7, True),
]
TOKEN_IDS = ["sigmoid", "ipo-ld", "mpo-wpo", "aot-norm-ld0", "sft-apo-ipo-ld-wpo"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names,weights,ld_alpha,weighting", TOKEN_CASES, ids=TOKEN_IDS)
@pytest.mark.parametrize("pairs", [1, 5])
@pytest.mark.parametrize("per_token_ref", [True, False], ids=["ref_tokens", "ref_seq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_preference_loss_matches_float64(backend, names, weights, ld_alpha, weighting, pairs,
                                               per_token_ref, dtype):
    if ld_alpha is not None and not per_token_ref:
        per_token_ref = True  # a sequence reference would have to be LD-weighted already
    policy, ref, mask, log_sum_sq = token_inputs(pairs, 11, dtype, per_token_ref)
    lss = log_sum_sq if weighting else None
    leaf = policy.clone().requires_grad_(True)
    out = pyalign.token_preference_loss(leaf, ref, mask, loss=names, loss_weights=weights, beta=0.2,
                                        ld_alpha=ld_alpha, use_weighting=weighting,
                                        log_sum_sq_probs=lss, reduction="none", backend=backend)
    upstream = torch.randn(pairs)
    out.loss.backward(upstream)
    clean_policy = torch.where(mask, policy.double(), 0.0)
    clean_ref = torch.where(mask, ref.double(), 0.0) if ref.dim() == 2 else ref
    expected, (exp_grad,) = grads64(
        lambda p: token_preference64(p, clean_ref, mask, names, 0.2, weights=weights,
                                     ld_alpha=ld_alpha, log_sum_sq_probs=lss),
        [clean_policy], upstream)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert leaf.grad.dtype == dtype and torch.all(leaf.grad[~mask] == 0)
    torch.testing.assert_close(leaf.grad.double(), exp_grad, **tol)
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
def test_token_preference_loss_average_log_prob(backend, loss):
    """Per-token means: ipo and sigmoid_norm take them as they are, sft still counts tokens."""
    policy, ref, mask, _ = token_inputs(4, 9)
    eps = SMOOTHING.get(loss, 0.0)
    leaf = policy.clone().requires_grad_(True)
    out = pyalign.token_preference_loss(leaf, ref, mask, loss=loss, beta=0.5, label_smoothing=eps,
                                        average_log_prob=True, reduction="sum", backend=backend)
    out.loss.backward()
    expected, (exp_grad,) = grads64(
        lambda p: token_preference64(p, torch.where(mask, ref.double(), 0.0), mask, [loss], 0.5,
                                     eps_for(eps), average=True).sum(),
        [torch.where(mask, policy.double(), 0.0)])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


def log_sum_sq_probs64(logits):
    log_softmax = logits.double() - torch.logsumexp(logits.double(), -1, keepdim=True)
    return torch.logsumexp(2 * log_softmax, -1)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("names,weights,ld_alpha,weighting", TOKEN_CASES[1:], ids=TOKEN_IDS[1:])
def test_linear_preference_loss_options_match_float64(backend, names, weights, ld_alpha, weighting):
    hidden, weight, labels = sequence_case(3, 13)
    mask = labels != IGNORE
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape)
    ref_tokens64 = token_logprobs64(linear_logits64(ref_hidden, weight), labels)
    hidden_leaf = hidden.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(hidden_leaf, weight, labels, ref_hidden=ref_hidden,
                                         ref_weight=weight, loss=names, loss_weights=weights, beta=0.2,
                                         ld_alpha=ld_alpha, use_weighting=weighting, chunk_size=7,
                                         reduction="none", backend=backend)
    upstream = torch.randn(3)
    out.loss.backward(upstream)
    lss = log_sum_sq_probs64(linear_logits64(hidden, weight)) if weighting else None

    def losses_of(h):
        tokens = token_logprobs64(linear_logits64(h, weight), labels)
        return token_preference64(tokens, ref_tokens64, mask, names, 0.2, weights=weights,
                                  ld_alpha=ld_alpha, log_sum_sq_probs=lss)

    expected, (exp_grad_hidden,) = grads64(losses_of, [hidden], upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden_leaf.grad.double(), exp_grad_hidden, rtol=1e-4, atol=1e-6)
    assert torch.all(hidden_leaf.grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combination", COMBINATIONS, ids=COMBINATION_IDS)
@pytest.mark.parametrize("f_divergence,alpha", [("reverse_kl", 0.5), ("js_divergence", 0.5)],
                         ids=["reverse_kl", "js"])
def test_combinations_on_every_backend_match_eager(backend, combination, f_divergence, alpha):
    names, weights = combination
    if f_divergence != "reverse_kl":
        names = [name for name in names if losses.REGISTRY[name].f_divergence]
        weights = None
    policy, ref, mask, log_sum_sq = token_inputs(6, 10)
    kwargs = dict(loss=names, loss_weights=weights, beta=0.4, label_smoothing=0.1,
                  f_divergence=f_divergence, f_alpha_divergence_coef=alpha, reduction="none")
    results = []
    for name in (backend, "eager"):
        leaf = policy.clone().requires_grad_(True)
        out = pyalign.token_preference_loss(leaf, ref, mask, backend=name, **kwargs)
        out.loss.backward(torch.linspace(0.5, 1.5, 6))
        results.append((out.loss, leaf.grad))
    (loss, grad), (eager_loss, eager_grad) = results
    torch.testing.assert_close(loss, eager_loss, **PAIR_TOL)
    torch.testing.assert_close(grad, eager_grad, **PAIR_TOL)


# ------------------------------------------------------------------------------ bad input

def bad_call(**kwargs):
    pairs = random_pairs(3)
    return pyalign.preference_loss(*pairs, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(loss="dpo"), ValueError, "unknown preference loss 'dpo'"),
    (dict(loss=["sigmoid", "dpo"]), ValueError,
     r"unknown preference loss 'dpo' in loss=\['sigmoid', 'dpo'\]"),
    (dict(loss=[]), TypeError, "non-empty list"),
    (dict(loss="kto"), ValueError, "unknown preference loss 'kto'"),
    (dict(loss=["sigmoid", 3]), TypeError, "loss must be a str"),
    (dict(loss=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights must be a list of 2"),
    (dict(loss=["sigmoid", "ipo"], loss_weights=[1.0, -0.5]), ValueError,
     "loss_weights must be finite numbers >= 0"),
    (dict(loss=["sigmoid", "ipo"], loss_weights=[1.0, float("nan")]), ValueError, "loss_weights must be"),
    (dict(loss="sigmoid", loss_weights=0.5), ValueError, "loss_weights must be a list of 1"),
    (dict(f_divergence="kl"), ValueError, "f_divergence"),
    (dict(loss=["sigmoid", "bco_pair"], f_divergence="forward_kl"), ValueError,
     r"f_divergence='forward_kl' applies only .* not to \['bco_pair'\]"),
    (dict(loss="aot", f_divergence="js_divergence"), ValueError, r"not to \['aot'\]"),
    (dict(f_divergence="alpha_divergence", f_alpha_divergence_coef=float("inf")), ValueError,
     "f_alpha_divergence_coef"),
    (dict(loss="sigmoid_norm"), ValueError,
     "loss 'sigmoid_norm' needs chosen_lengths and rejected_lengths"),
    (dict(loss=["sigmoid", "sft"]), ValueError, "loss 'sft' needs chosen_lengths"),
    (dict(loss="sft", chosen_lengths=torch.tensor([1, -2, 3])), ValueError,
     "chosen_lengths must hold finite"),
    (dict(loss="sft", chosen_lengths=torch.tensor([1, 2])), ValueError, "chosen_lengths"),
    (dict(loss="sft", chosen_lengths=torch.tensor([True, False, True])), TypeError, "chosen_lengths"),
    (dict(ld_alpha=0.5), TypeError, "ld_alpha"),  # per-token inputs only
    (dict(simpo_gamma=1.0), ValueError, r"simpo_gamma applies only to \('simpo',\)"),
    (dict(loss="simpo", simpo_gamma=float("nan")), ValueError, "simpo_gamma must be"),
    (dict(loss="simpo", simpo_gamma="1"), TypeError, "simpo_gamma must be a real number"),
])
def test_bad_loss_configurations_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        bad_call(**kwargs)


def test_a_reference_is_required_unless_every_loss_is_reference_free():
    policy_chosen, policy_rejected, ref_chosen, _ = random_pairs(3)
    with pytest.raises(ValueError, match=r"loss \['sigmoid'\] needs the reference log-probs"):
        pyalign.preference_loss(policy_chosen, policy_rejected)
    with pytest.raises(ValueError, match=r"loss \['ipo'\] needs the reference .* \('sft', 'simpo', "
                                         r"'cpo', 'orpo'\)"):
        pyalign.preference_loss(policy_chosen, policy_rejected, loss=["cpo", "ipo"])
    with pytest.raises(ValueError, match="give both ref_chosen and ref_rejected, or neither"):
        pyalign.preference_loss(policy_chosen, policy_rejected, ref_chosen, loss="cpo")
    hidden, weight, labels = linear_case()
    with pytest.raises(ValueError, match=r"needs the reference log-probs: give ref_logps "
                                         r"\(precomputed \[2B\]\) or ref_hidden"):
        pyalign.linear_preference_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="ref_weight / ref_bias are given without ref_hidden"):
        pyalign.linear_preference_loss(hidden, weight, labels, loss="orpo", ref_weight=weight)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be in \[0, 1\]"),
    (dict(ld_alpha=-0.1), ValueError, "ld_alpha"),
    (dict(ld_alpha=0.5, average_log_prob=True), ValueError, "ld_alpha .* average_log_prob"),
    (dict(loss=["sigmoid", "aot"], use_weighting=True), ValueError, r"use_weighting .* \['aot'\]"),
    (dict(use_weighting=True), ValueError, "use_weighting=True needs log_sum_sq_probs"),
    (dict(log_sum_sq_probs=torch.zeros(4, 5)), ValueError, "only used with use_weighting"),
    (dict(use_weighting=True, log_sum_sq_probs=torch.zeros(4, 4)), ValueError, "log_sum_sq_probs"),
    (dict(use_weighting="yes"), TypeError, "use_weighting"),
])
def test_bad_token_options_are_refused(kwargs, error, match):
    policy = -torch.rand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(error, match=match):
        pyalign.token_preference_loss(policy, policy.clone(), mask, **kwargs)


def test_bad_token_shapes_are_refused():
    with pytest.raises(ValueError, match=r"policy_token_logps must be \[2B, T\]"):
        pyalign.token_preference_loss(torch.randn(3, 4), torch.randn(3), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ref_logps must be"):
        pyalign.token_preference_loss(torch.randn(4, 4), torch.randn(2), torch.ones(4, 4, dtype=torch.bool))
    half = torch.ones(4, 4)
    half[2, 1] = 0.5
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got 0.5 at "
                                         r"position \(2, 1\)"):
        pyalign.token_preference_loss(torch.randn(4, 4), torch.randn(4), half)
    with pytest.raises(ValueError, match=r"loss \['sigmoid'\] needs the reference log-probs: "
                                         r"give ref_logps"):
        pyalign.token_preference_loss(torch.randn(4, 4), None, torch.ones(4, 4, dtype=torch.bool),
                                      loss=["sigmoid", "simpo"])
    hidden, weight, labels = linear_case()
    with pytest.raises(ValueError, match=r"use_weighting .* \['aot_unpaired'\]"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_logps=torch.zeros(6),
                                       loss="aot_unpaired", use_weighting=True)
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_logps=torch.zeros(6), ld_alpha=2)
