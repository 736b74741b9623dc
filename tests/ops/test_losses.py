"""The loss registry (pyalign/losses/): what derives from it, every hand-derived gradient
against autograd of the entry's forward in float64, and every loss on every backend over a sweep
of scaled margins |beta*h| from 1e-3 to 1e4 (both signs) against the float64 oracle of
tests/support.py, plus a rejected log-prob of -inf."""
import re

import pytest
import torch

import pyalign
from pyalign import losses
from support import backends_for, grad_of, grads64, preference64

BACKENDS = backends_for("preference")
PAIRWISE = [losses.REGISTRY[name] for name in losses.PAIRWISE_NAMES]
OWN_MATH = [entry for entry in PAIRWISE if entry.pair_math is None]  # own forward and gradient


def test_everything_derives_from_the_registry():
    from pyalign.kernels import preference as triton_preference
    from pyalign.trainers.presets import ALGOS

    # every preference algorithm's loss (and so the CLI's choices) comes from the registry
    assert {a.defaults["loss"] for a in ALGOS.values() if a.family == "preference"} <= set(losses.NAMES)
    assert set(losses.NAMES) - set(losses.PAIRWISE_NAMES) == set(losses.UNPAIRED_NAMES) == {
        "kto", "apo_zero_unpaired"}
    assert len(losses.PAIRWISE_NAMES) == 18  # TRL 1.16's DPO loss types, SimPO, CPO and ORPO
    assert set(losses.REFERENCE_FREE_NAMES) == {"sft", "simpo", "cpo", "orpo"}
    assert losses.SIMPO_GAMMA_LOSSES == ("simpo",)
    assert [e.name for e in PAIRWISE if e.probabilities] == ["orpo"]
    assert [e.name for e in PAIRWISE if e.chunks] == ["sft"]
    ids = triton_preference.LOSS_IDS
    assert sorted(ids.values()) == list(range(triton_preference.KERNEL_BRANCHES))
    assert all(ids[entry.name] == entry.kernel_id for entry in PAIRWISE if entry.kernel_id is not None)
    for entry in losses.REGISTRY.values():
        assert re.fullmatch(r"\d{4}\.\d{5}", entry.paper), entry.name
        assert entry.equation, f"{entry.name}: the forward's docstring states the equation"
        assert entry.pairwise or entry.kernel_id is None, entry.name
        if not entry.pairwise:
            continue
        # own pair math with a gradient, or another entry's (that has one): never both
        assert (entry.pair_math is None) == (entry.forward is not None), entry.name
        assert entry.math.grad is not None and entry.math.pair_math is None, entry.name
        assert entry.pair_math is None or entry.kernel_id is None, entry.name
        assert entry.length_normalized in ("never", "always", "when_given"), entry.name
        assert set(entry.needs) <= set(losses.PairBatch._fields), entry.name
    # TRL's f-divergence losses (DPOTrainer.__init__), and which losses TRL sorts
    assert set(losses.F_DIVERGENCE_LOSSES) == {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair",
                                               "robust", "discopop", "sft"}
    assert {e.name for e in PAIRWISE if not e.pair_weights} == {"aot", "aot_unpaired"}
    assert set(losses.F_DIVERGENCE_NAMES) == {"reverse_kl", "forward_kl", "js_divergence",
                                              "alpha_divergence"}
    for divergence in losses.F_DIVERGENCES.values():
        assert re.fullmatch(r"\d{4}\.\d{5}", divergence.paper) and divergence.equation, divergence


def test_kernel_ids_assert_every_branch_has_an_entry():
    with pytest.raises(AssertionError, match="branches"):
        losses.kernel_ids(len(losses.PAIRWISE_NAMES) + 1)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        losses.get("kto")
    assert losses.get("kto", pairwise=False).name == "kto"
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'"):
        losses.get("dpo", pairwise=False)


def gradient_cases():
    cases = []
    for entry in OWN_MATH:
        smoothing = [0.0, 0.1, 0.3] if entry.uses_label_smoothing else [0.0]
        for eps in smoothing:
            cases.append(pytest.param(entry.name, eps, id=f"{entry.name}-eps{eps}"))
    return cases


@pytest.mark.parametrize("beta", [0.1, 1.0, 50.0])
@pytest.mark.parametrize("name,label_smoothing", gradient_cases())
def test_hand_gradient_is_autograd_of_the_forward(name, label_smoothing, beta):
    """float64, random log-ratios from small to |beta*h| ~ 1e4."""
    entry = losses.REGISTRY[name]
    eps = losses.effective_label_smoothing(name, label_smoothing)
    generator = torch.Generator().manual_seed(7)
    scale = 10.0 ** torch.linspace(-3, 4, 64, dtype=torch.float64) / beta
    signs = torch.randint(0, 2, (2, 64), generator=generator, dtype=torch.float64) * 2 - 1
    rw = signs[0] * scale * torch.rand(64, generator=generator, dtype=torch.float64)
    rl = signs[1] * scale * torch.rand(64, generator=generator, dtype=torch.float64)
    if entry.probabilities:  # log-probabilities: -1e-5 .. -1e5
        rw, rl = -rw.abs() - 1e-9, -rl.abs() - 1e-9
    rw, rl = rw.requires_grad_(True), rl.requires_grad_(True)
    values = entry.forward(rw, rl, beta, eps)
    assert torch.isfinite(values).all(), name
    auto_w, auto_l = torch.autograd.grad(values.sum(), (rw, rl), materialize_grads=True)
    hand_w, hand_l = entry.grad(rw.detach(), rl.detach(), beta, eps)
    for hand, auto in ((hand_w, auto_w), (hand_l, auto_l)):
        assert hand.dtype == torch.float64 and torch.isfinite(hand).all(), name
        torch.testing.assert_close(hand, auto, rtol=1e-9, atol=1e-12 * max(beta, 1.0))


MARGINS = [1e-3, 1.0, 30.0, 100.0, 1e4]


SWEEP_LENGTH = 4.0  # the completion lengths of losses that need them (sigmoid_norm, sft)


def length_kwargs(loss, count, length=SWEEP_LENGTH):
    """chosen_lengths/rejected_lengths for a loss whose registry entry needs them, else {}."""
    if not losses.REGISTRY[loss].needs:
        return {}
    return dict(chosen_lengths=torch.full((count,), length), rejected_lengths=torch.full((count,), length))


def sweep_inputs(beta, scale=1.0, probabilities=False):
    """fp32 sequence log-probs whose scaled margins beta*h/scale cover +-MARGINS (times 1.02, off
    the hinge's kink), each split three ways between r_w and r_l; the reference log-probs are 0
    so the fp32 log-ratios are exact (``scale``: a length sigmoid_norm divides by, a power of 2).
    ``probabilities``: log-probs <= 0 (ORPO), each pair shifted down to a largest of -1/64."""
    x = torch.tensor(MARGINS, dtype=torch.float64) * 1.02
    x = torch.cat([x, -x])
    h = scale * x / beta
    rw = torch.cat([h / 2, h, torch.zeros_like(h)])
    rl = torch.cat([-h / 2, torch.zeros_like(h), -h])
    if probabilities:
        shift = torch.maximum(rw, rl) + 1 / 64
        rw, rl = rw - shift, rl - shift
    policy_chosen, policy_rejected = rw.float(), rl.float()
    zeros = torch.zeros_like(policy_chosen)
    return [policy_chosen, policy_rejected, zeros, zeros.clone()]


def sweep_smoothing(entry):
    return [0.0, entry.zero_smoothing_substitute or 0.1] if entry.uses_label_smoothing else [0.0]


def assert_grad_close(grad, expected, margins, beta):
    """Relative (1e-4) down to an absolute floor of 1e-10*beta, so that a 1 - sigmoid
    cancellation at large |x| shows; near x = 0 (|x| <= 1.1) a gradient can be the difference of
    two O(beta) terms (apo_down's beta*(sigmoid'(u_w) - sigmoid'(x))), so fp32 rounding of those,
    1e-7*beta, is allowed there."""
    floor = torch.where(margins.abs() <= 1.1, 1e-7, 1e-10) * beta
    bad = (grad - expected).abs() > floor + 1e-4 * expected.abs()
    assert not bad.any(), (f"gradients off at x = {margins[bad].tolist()}: got {grad[bad].tolist()}, "
                           f"expected {expected[bad].tolist()}")


@pytest.mark.parametrize("beta", [0.1, 50.0])
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_margin_sweep_matches_float64(backend, loss, beta):
    """Every loss, the batch-level ones included (aot sorts these margins: the reference ones
    are 0, so each input keeps its own x; sigmoid_norm divides by lengths of 4)."""
    lengths = length_kwargs(loss, 30)
    entry = losses.REGISTRY[loss]
    scale = SWEEP_LENGTH if entry.length_normalized == "always" else 1.0
    inputs = sweep_inputs(beta, scale, entry.probabilities)
    upstream = torch.linspace(0.5, 1.5, inputs[0].numel())
    for label_smoothing in sweep_smoothing(losses.REGISTRY[loss]):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = pyalign.preference_loss(*leaves, loss=loss, beta=beta, label_smoothing=label_smoothing,
                                      reduction="none", backend=backend, **lengths)
        out.loss.backward(upstream)
        eps = losses.effective_label_smoothing(loss, label_smoothing)
        expected, exp_grads = grads64(
            lambda *t, eps=eps: preference64(*t, loss, beta, eps, **lengths), inputs, upstream)
        assert torch.isfinite(expected).all() and all(torch.isfinite(g).all() for g in exp_grads)
        margins = beta * (inputs[0].double() - inputs[1].double()) / scale
        assert torch.isfinite(out.loss).all(), (loss, label_smoothing, out.loss)
        # sft is a batch sum of these +-1e5 log-probs that cancels to ~0: fp32 rounding of the
        # terms' size, not of the result
        atol = 1e-6 * float(inputs[0].abs().sum()) / (30 * SWEEP_LENGTH) if loss == "sft" else 1e-7
        torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=atol)
        for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
            grad = grad_of(leaf)
            assert torch.isfinite(grad).all(), (loss, label_smoothing, grad)
            assert_grad_close(grad.double(), exp_grad, margins, beta)


@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_logprob_of_minus_inf_gives_the_limit(backend, loss):
    """A rejected completion the policy gives probability 0: r_l = -inf, x = +inf. Where the loss
    has a finite limit (all but ipo and sppo_hard) it is that limit, with finite gradients (the
    oracle at r_l = -1e300 in float64); e.g. sigmoid's eps * logsig(-x) would be 0 * -inf = NaN."""
    policy_chosen = torch.tensor([-3.0, -5.0])
    policy_rejected = torch.tensor([float("-inf"), -4.0])
    ref = torch.tensor([-4.0, -4.5])
    inputs = (policy_chosen, policy_rejected, ref, ref)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    lengths = length_kwargs(loss, 2, length=3.0)
    out = pyalign.preference_loss(*leaves, loss=loss, beta=0.1, reduction="none", backend=backend,
                                  **lengths)
    out.loss.sum().backward()
    eps = losses.effective_label_smoothing(loss, 0.0)
    limit_inputs = [t.double() for t in inputs]
    limit_inputs[1] = torch.tensor([-1e300, -4.0], dtype=torch.float64)
    expected, exp_grads = grads64(lambda *t: preference64(*t, loss, 0.1, eps, **lengths),
                                  limit_inputs)
    if not torch.isfinite(expected[0]):  # ipo, sppo_hard: the loss itself is infinite
        assert out.loss[0] == float("inf")
        return
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        torch.testing.assert_close(grad_of(leaf).double(), exp_grad, rtol=1e-5, atol=1e-7)
