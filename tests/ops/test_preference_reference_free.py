"""The reference-free preference losses (simpo, cpo, orpo, and sft beside them: the registry's
REFERENCE_FREE_NAMES) run without any reference on every entry point and backend, against the
float64 oracle of tests/support.py written from the papers (SimPO eq. 6, CPO eq. 3, ORPO eq. 4-7),
values and gradients: ``preference_loss``, ``token_preference_loss`` (its fused sequence kernel
for orpo on per-token means) and ``linear_preference_loss``, whose 3-matmul path scores no
reference and takes sft's batch mean chunk by chunk. A reference given anyway enters the rewards
alone. ORPO stays finite at a chosen log-prob of exactly 0 (probability 1) and accurate near it.
TRL's own CPOTrainer / ORPOTrainer code: tests/ops/test_preference_trl_cpo.py."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pyalign
from pyalign.ops import linear_preference
from support import (
    DEVICE,
    IGNORE,
    backend_cases,
    backends_for,
    grad_of,
    grads64,
    linear_logits64,
    preference64,
    random_lengths,
    token_logprobs64,
    token_preference64,
)

BACKENDS = backends_for("preference")
# (losses, weights): each alone, TRL's CPO / CPO-SimPO / ORPO (with the NLL, sft), and a mix
COMBINATIONS = [(["simpo"], None), (["cpo"], None), (["orpo"], None), (["cpo", "sft"], [1.0, 0.7]),
                (["simpo", "sft"], [1.0, 1.0]), (["orpo", "sft"], None)]
IDS = ["-".join(names) for names, _ in COMBINATIONS]


def policy_pairs(pairs, dtype=torch.float32):
    """Summed sequence log-probs of realistic size (-5 .. -45), [B] x 2."""
    return [(-5 - 40 * torch.rand(pairs)).to(dtype) for _ in range(2)]


def gamma_kwargs(names, gamma):
    """simpo_gamma for a combination with simpo (the others refuse a non-default one)."""
    return dict(simpo_gamma=gamma) if "simpo" in names else {}


def combined64(names, weights, pc, pr, beta, eps=0.0, gamma=0.5, **lengths):
    weights = weights or [1.0] * len(names)
    zeros = torch.zeros_like(pc)
    return sum(w * preference64(pc, pr, zeros, zeros, name, beta, eps, gamma=gamma, **lengths)
               for name, w in zip(names, weights, strict=True))


# with the lengths (sums), or without them (per-token means; sft needs them: sums only)
LENGTH_CASES = [pytest.param(names, weights, lengths, id=f"{'-'.join(names)}-{kind}")
                for names, weights in COMBINATIONS
                for lengths, kind in ((True, "sums"), (False, "means")) if lengths or "sft" not in names]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names,weights,lengths", LENGTH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_preference_loss_without_a_reference_matches_float64(backend, names, weights, lengths,
                                                              dtype):
    """With the completion lengths simpo and orpo average the summed log-probs (as TRL); without
    them they take what they are given (per-token means: scaled down here)."""
    pairs = 7
    policy_chosen, policy_rejected = policy_pairs(pairs, dtype)
    length_kwargs = {}
    if lengths:
        length_kwargs = dict(chosen_lengths=random_lengths(pairs), rejected_lengths=random_lengths(pairs))
    else:  # per-token means, of a probability below 1
        policy_chosen, policy_rejected = policy_chosen / 9, policy_rejected / 9
    leaves = [t.clone().requires_grad_(True) for t in (policy_chosen, policy_rejected)]
    out = pyalign.preference_loss(*leaves, loss=names, loss_weights=weights, beta=0.7,
                                  label_smoothing=0.1, reduction="none", backend=backend,
                                  **gamma_kwargs(names, 0.3), **length_kwargs)
    upstream = torch.randn(pairs)
    out.loss.backward(upstream)
    expected, exp_grads = grads64(  # orpo and sft take no label smoothing
        lambda pc, pr: combined64(names, weights, pc, pr, 0.7, 0.1, gamma=0.3, **length_kwargs),
        [policy_chosen, policy_rejected], upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        assert grad_of(leaf).dtype == dtype
        torch.testing.assert_close(grad_of(leaf).double(), exp_grad, **grad_tol)
    # TRL's CPO/ORPO rewards: beta times the policy's log-probs (as given: sums or means)
    torch.testing.assert_close(out.chosen_rewards.double(), 0.7 * policy_chosen.double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.margins.double(),
                               0.7 * (policy_chosen.double() - policy_rejected.double()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names,weights", COMBINATIONS, ids=IDS)
def test_a_given_reference_enters_the_rewards_alone(backend, names, weights):
    pairs = 5
    policy_chosen, policy_rejected = policy_pairs(pairs)
    ref_chosen, ref_rejected = policy_pairs(pairs)
    lengths = dict(chosen_lengths=random_lengths(pairs), rejected_lengths=random_lengths(pairs))
    results = []
    for reference in ((), (ref_chosen, ref_rejected)):
        leaves = [t.clone().requires_grad_(True) for t in (policy_chosen, policy_rejected, *reference)]
        out = pyalign.preference_loss(*leaves, loss=names, loss_weights=weights, reduction="sum",
                                      backend=backend, **lengths)
        out.loss.backward()
        assert all(grad_of(leaf).eq(0).all() for leaf in leaves[2:])  # the reference: no gradient
        results.append((out, [leaf.grad for leaf in leaves[:2]]))
    (alone, alone_grads), (given, given_grads) = results
    torch.testing.assert_close(given.loss, alone.loss, rtol=0, atol=0)
    for grad, alone_grad in zip(given_grads, alone_grads, strict=True):
        torch.testing.assert_close(grad, alone_grad, rtol=0, atol=0)
    torch.testing.assert_close(given.chosen_rewards, 0.1 * (policy_chosen - ref_chosen))


def token_case(pairs, tokens=8):
    mask = torch.ones(2 * pairs, tokens, dtype=torch.bool)
    mask[:, :2] = False  # the prompt
    mask &= torch.arange(tokens) < torch.randint(3, tokens + 1, (2 * pairs, 1))
    clean = -3 * torch.rand(2 * pairs, tokens)
    return torch.where(mask, clean, float("nan")), mask  # NaN off the completion: selected away


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names,weights", COMBINATIONS, ids=IDS)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("weighting", [False, True], ids=["", "wpo"])
def test_token_preference_loss_without_a_reference_matches_float64(backend, names, weights, average,
                                                                   weighting):
    """orpo alone on per-token means runs the backend's fused reduce-and-loss kernel."""
    policy, mask = token_case(4)
    log_sum_sq = torch.where(mask, -0.5 - torch.rand(mask.shape), float("nan")) if weighting else None
    leaf = policy.clone().requires_grad_(True)
    out = pyalign.token_preference_loss(leaf, None, mask, loss=names, loss_weights=weights,
                                        beta=0.4, **gamma_kwargs(names, 0.2),
                                        average_log_prob=average,
                                        use_weighting=weighting, log_sum_sq_probs=log_sum_sq,
                                        reduction="none", backend=backend)
    upstream = torch.randn(4)
    out.loss.backward(upstream)
    expected, (exp_grad,) = grads64(
        lambda p: token_preference64(p, None, mask, names, 0.4, weights=weights, average=average,
                                     log_sum_sq_probs=log_sum_sq, gamma=0.2),
        [torch.where(mask, policy.double(), 0.0)], upstream)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(leaf.grad[~mask] == 0)
    torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


def head_case(pairs=4, tokens=7, hidden_size=8, vocab=19, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(2 * pairs, tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / 2
    labels = torch.randint(0, vocab, (2 * pairs, tokens), generator=generator)
    labels[:, :2] = IGNORE  # the prompt
    labels[1, -2:] = IGNORE  # padding
    return hidden, weight, labels


# the Triton interpreter (slow) gets the two pair-math branches, each with sft
LINEAR_CASES = backend_cases("linear_logprobs", [tuple(c) for c in COMBINATIONS],
                             [tuple(c) for c in COMBINATIONS if c[0] in (["orpo", "sft"],
                                                                          ["simpo", "sft"])])


@pytest.mark.parametrize("backend,names,weights", LINEAR_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["3-matmul", "recompute"])
def test_linear_preference_loss_without_a_reference_matches_float64(backend, names, weights,
                                                                    reduction):
    hidden, weight, labels = head_case()
    mask = labels != IGNORE
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = pyalign.linear_preference_loss(*leaves, labels, loss=names, loss_weights=weights,
                                         beta=0.6, chunk_size=5, reduction=reduction,
                                         backend=backend)
    out.loss.mean().backward()
    expected, exp_grads = grads64(
        lambda h, w: token_preference64(token_logprobs64(linear_logits64(h, w), labels), None,
                                        mask, names, 0.6, weights=weights).mean(),
        [hidden, weight])
    torch.testing.assert_close(out.loss.mean().double(), expected, rtol=1e-5, atol=1e-6)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(leaves[0].grad[~mask] == 0)


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("names,weights", COMBINATIONS, ids=IDS)
def test_three_matmuls_and_no_reference(monkeypatch, names, weights):
    """The 3-matmul path runs for every reference-free loss, sft's batch mean included: forward
    and backward cost exactly 3 matmuls of kept tokens x H x V, and nothing scores a reference
    or calls the per-token op."""
    hidden, weight, labels = head_case(pairs=3, tokens=8, vocab=40)
    kept = int((labels != IGNORE).sum())
    one_matmul = 2 * kept * hidden.shape[-1] * weight.shape[0]

    def refuse(*args, **kwargs):
        raise AssertionError("the 3-matmul path called linear_token_logprobs")

    monkeypatch.setattr(linear_preference, "linear_token_logprobs", refuse)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter:
        pyalign.linear_preference_loss(*leaves, labels, loss=names, loss_weights=weights,
                                       chunk_size=5).loss.backward()
    assert counter.get_total_flops() == 3 * one_matmul


ORPO_POINTS = [(0.0, -2.0), (0.0, -1e-5), (-1e-7, -3.0), (-1e-4, -1e-3), (-0.69, -0.7),
               (-20.0, -1e-6), (-3.0, float("-inf")), (float("-inf"), -2.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_at_and_near_a_log_prob_of_zero(backend):
    """A chosen log-prob of exactly 0 (probability 1: infinite odds) gives the limit, loss 0 with
    the finite gradient -beta*odds_l (the oracle at -1e-300); near 0 the log-odds keep their
    digits (log(1 - e^p) as log(-expm1(p))); a log-prob of -inf (odds 0) gives the limit too. A
    rejected log-prob of 0 is an infinite loss with an infinite gradient, as the math says."""
    chosen = torch.tensor([c for c, _ in ORPO_POINTS])
    rejected = torch.tensor([r for _, r in ORPO_POINTS])
    leaves = [t.clone().requires_grad_(True) for t in (chosen, rejected)]
    out = pyalign.preference_loss(*leaves, loss="orpo", beta=0.5, reduction="none",
                                  backend=backend)
    out.loss.sum().backward()
    limit = [torch.where(t == 0, -1e-300, t.double()) for t in (chosen, rejected)]
    expected, exp_grads = grads64(lambda pc, pr: preference64(pc, pr, pc, pr, "orpo", 0.5), limit)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        torch.testing.assert_close(grad_of(leaf).double(), exp_grad, rtol=1e-5, atol=1e-7)
    leaves = [torch.tensor([-0.5], requires_grad=True), torch.tensor([0.0], requires_grad=True)]
    out = pyalign.preference_loss(*leaves, loss="orpo", beta=0.5, backend=backend)
    out.loss.backward()
    assert out.loss == float("inf") and leaves[1].grad == float("inf")
    # d/dp_w = -beta sigma(-z) / (1 - e^p_w) with sigma(-z) = 1: finite
    torch.testing.assert_close(leaves[0].grad.double(),
                               torch.tensor([-0.5 / -torch.expm1(torch.tensor(-0.5)).item()],
                                            dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, -1.0])
def test_simpo_gamma_is_the_target_margin(backend, gamma):
    policy_chosen, policy_rejected = policy_pairs(6)
    lengths = dict(chosen_lengths=random_lengths(6), rejected_lengths=random_lengths(6))
    leaves = [t.clone().requires_grad_(True) for t in (policy_chosen, policy_rejected)]
    out = pyalign.preference_loss(*leaves, loss="simpo", beta=2.0, simpo_gamma=gamma,
                                  reduction="none", backend=backend, **lengths)
    out.loss.sum().backward()
    expected, exp_grads = grads64(
        lambda pc, pr: combined64(["simpo"], None, pc, pr, 2.0, gamma=gamma, **lengths),
        [policy_chosen, policy_rejected])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss,kwargs,liger_name,liger_kwargs", [
    (["orpo", "sft"], dict(average_log_prob=True), "LigerFusedLinearORPOLoss", {}),
    (["cpo", "sft"], {}, "LigerFusedLinearCPOLoss", dict(alpha=1.0)),
    ("simpo", dict(simpo_gamma=0.7), "LigerFusedLinearSimPOLoss",
     dict(gamma=0.7, compute_nll_loss=False)),
    (["simpo", "sft"], dict(simpo_gamma=0.7), "LigerFusedLinearSimPOLoss", dict(gamma=0.7)),
], ids=["orpo", "cpo", "simpo", "cpo-simpo"])
def test_liger_kernel_fused_losses_agree(loss, kwargs, liger_name, liger_kwargs):
    """Liger-Kernel's fused ORPO, CPO and SimPO (its nll over the same completion tokens) give the
    same loss and gradients from the same hidden states and head."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed")
    hidden, weight, labels = head_case(pairs=3, tokens=9, hidden_size=8, vocab=23)
    liger_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    liger_loss = getattr(chunked, liger_name)(beta=0.4, compiled=False, **liger_kwargs)
    expected = liger_loss(liger_leaves[1], liger_leaves[0], labels)
    expected = expected[0] if isinstance(expected, tuple) else expected
    expected.backward()
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = pyalign.linear_preference_loss(*leaves, labels, loss=loss, beta=0.4, **kwargs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for leaf, liger_leaf in zip(leaves, liger_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, liger_leaf.grad, rtol=1e-4, atol=1e-6)
