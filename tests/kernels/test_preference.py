"""Triton preference losses (kernels/preference.py) against a float64 oracle: the eleven pair
losses forward and backward, and the fused sequence-reduce + loss kernel."""
import pytest
import torch

from oracle import grads64, preference64, sequence_logprobs64

from pyalign.kernels import preference as preference_kernels

LOSSES = ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
          "apo_zero", "apo_down", "discopop"]
SMOOTHING = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3}
TOL = dict(rtol=2e-5, atol=2e-5)


def _oracle(pc, pr, rc, rr, loss, beta, eps, grad_losses):
    """(losses, [grad_pc, grad_pr, grad_rc, grad_rr]) in float64."""
    return grads64(lambda *pair: preference64(*pair, loss, beta, eps), [pc, pr, rc, rr],
                   grad_losses)


def _pairs(num_pairs, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    ref_chosen = -20 - 5 * torch.rand(num_pairs, generator=gen)
    ref_rejected = -20 - 5 * torch.rand(num_pairs, generator=gen)
    policy_chosen = ref_chosen + scale * torch.randn(num_pairs, generator=gen)
    policy_rejected = ref_rejected + scale * torch.randn(num_pairs, generator=gen)
    grad_losses = torch.randn(num_pairs, generator=gen)
    return [t.to(device) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                   grad_losses)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_pair_losses_direct(loss, beta, device):
    *inputs, grad_losses = _pairs(300, device)  # 300 = one full block of 256 and a partial one
    eps = SMOOTHING.get(loss, 0.0)
    exp_losses, exp_grads = _oracle(*inputs, loss, beta, eps, grad_losses)
    losses = preference_kernels.forward(*inputs, loss, beta, eps)
    assert losses.dtype == torch.float32 and losses.shape == (300,)
    torch.testing.assert_close(losses.double().cpu(), exp_losses.cpu(), **TOL)
    grads = preference_kernels.backward(grad_losses, *inputs, loss, beta, eps)
    for grad, expected in zip(grads, exp_grads):
        torch.testing.assert_close(grad.double().cpu(), expected.cpu(), **TOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_pair_losses_match_eager_reference(loss, device):
    from pyalign.eager import preference as eager_preference
    *inputs, grad_losses = _pairs(40, device, seed=1)
    eps = SMOOTHING.get(loss, 0.0)
    torch.testing.assert_close(preference_kernels.forward(*inputs, loss, 0.5, eps),
                               eager_preference.forward(*inputs, loss, 0.5, eps), **TOL)
    for mine, eager in zip(preference_kernels.backward(grad_losses, *inputs, loss, 0.5, eps),
                           eager_preference.backward(grad_losses, *inputs, loss, 0.5, eps)):
        torch.testing.assert_close(mine, eager, **TOL)


def test_bf16_inputs_and_extreme_margins(device):
    *inputs, grad_losses = _pairs(16, device, seed=2, scale=300.0)  # |beta*h| up to ~100
    inputs_bf16 = [t.to(torch.bfloat16) for t in inputs]
    for loss in LOSSES:
        exp_losses, exp_grads = _oracle(*inputs_bf16, loss, 0.1, SMOOTHING.get(loss, 0.0),
                                                    grad_losses)
        losses = preference_kernels.forward(*inputs_bf16, loss, 0.1, SMOOTHING.get(loss, 0.0))
        finite = torch.isfinite(exp_losses)
        assert finite[: len(finite) // 2].any()
        torch.testing.assert_close(losses.double()[finite].cpu(), exp_losses[finite].cpu(),
                                   rtol=1e-4, atol=1e-5)
        grads = preference_kernels.backward(grad_losses, *inputs_bf16, loss, 0.1,
                                            SMOOTHING.get(loss, 0.0))
        for grad, expected in zip(grads, exp_grads):
            assert grad.dtype == torch.bfloat16
            ok = torch.isfinite(expected)
            torch.testing.assert_close(grad.double()[ok].cpu(), expected[ok].cpu(), rtol=1e-2,
                                       atol=1e-6)


def test_nan_propagates(device):
    *inputs, grad_losses = _pairs(8, device, seed=3)
    inputs[0][3] = float("nan")
    for loss in LOSSES:
        losses = preference_kernels.forward(*inputs, loss, 0.1, SMOOTHING.get(loss, 0.0))
        assert torch.isnan(losses[3]) and torch.isfinite(losses[torch.arange(8) != 3]).all(), loss


@pytest.mark.parametrize("loss", LOSSES)
def test_public_api_triton_backend(loss, device):
    import pyalign
    *inputs, grad_losses = _pairs(9, device, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    eps = SMOOTHING.get(loss, 0.0)
    out = pyalign.preference_loss(*leaves, loss=loss, beta=0.3, label_smoothing=eps,
                                  reduction="none", backend="triton")
    (out.loss * grad_losses).sum().backward()
    exp_losses, exp_grads = _oracle(*inputs, loss, 0.3, eps, grad_losses)
    torch.testing.assert_close(out.loss.double().cpu(), exp_losses.cpu(), **TOL)
    for leaf, expected in zip(leaves, exp_grads):
        torch.testing.assert_close(leaf.grad.double().cpu(), expected.cpu(), **TOL)


def _sequence_oracle(token_logprobs, mask, ref_logps, loss, beta, eps, average, grad_losses):
    pairs = token_logprobs.shape[0] // 2
    reduced = {}

    def losses_of(lp, ref):
        policy_seq = sequence_logprobs64(lp, mask, average)
        ref_seq = sequence_logprobs64(ref, mask, average) if ref.dim() == 2 else ref
        reduced.update(policy=policy_seq.detach(), ref=ref_seq.detach())
        return preference64(policy_seq[:pairs], policy_seq[pairs:], ref_seq[:pairs],
                            ref_seq[pairs:], loss, beta, eps)

    losses, grads = grads64(losses_of, [token_logprobs, ref_logps], grad_losses)
    return losses, reduced["policy"], reduced["ref"], grads


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("ref_per_token", [False, True])
def test_sequence_reduce_and_loss(loss, average, ref_per_token, device):
    gen = torch.Generator().manual_seed(5)
    pairs, seq_len = 3, 37  # T not a multiple of the block (16 here)
    token_logprobs = -3 * torch.rand(2 * pairs, seq_len, generator=gen)
    mask = torch.rand(2 * pairs, seq_len, generator=gen) > 0.3
    mask[4] = False  # a row with no completion tokens: count clamps to 1
    if ref_per_token:
        ref_logps = token_logprobs + 0.3 * torch.randn(2 * pairs, seq_len, generator=gen)
    else:
        ref_logps = (token_logprobs * mask).sum(-1) + torch.randn(2 * pairs, generator=gen)
        if average:
            ref_logps = ref_logps / mask.sum(-1).clamp(min=1)
    grad_losses = torch.randn(pairs, generator=gen)
    token_logprobs, mask, ref_logps, grad_losses = (
        t.to(device) for t in (token_logprobs, mask, ref_logps, grad_losses))
    eps = SMOOTHING.get(loss, 0.0)
    beta = 0.1 if average else 0.05
    exp_losses, exp_policy, exp_ref, (exp_grad_tokens, exp_grad_ref) = _sequence_oracle(
        token_logprobs, mask, ref_logps, loss, beta, eps, average, grad_losses)
    losses, policy_seq, ref_seq = preference_kernels.sequence_preference_forward(
        token_logprobs, mask, ref_logps, loss, beta, eps, average, block_t=16)
    for actual, expected in ((losses, exp_losses), (policy_seq, exp_policy), (ref_seq, exp_ref)):
        torch.testing.assert_close(actual.double().cpu(), expected.cpu(), **TOL)
    grad_tokens, grad_ref = preference_kernels.sequence_preference_backward(
        grad_losses, token_logprobs, mask, ref_logps, policy_seq, ref_seq, loss, beta, eps, average,
        block_t=16)
    assert grad_ref.shape == ref_logps.shape
    torch.testing.assert_close(grad_tokens.double().cpu(), exp_grad_tokens.cpu(), **TOL)
    torch.testing.assert_close(grad_ref.double().cpu(), exp_grad_ref.cpu(), **TOL)


def test_sequence_bad_shapes_raise(device):
    lp = torch.zeros(3, 5, device=device)
    with pytest.raises(ValueError, match="2B, T"):
        preference_kernels.sequence_preference_forward(lp, lp > 0, lp[:, 0], "sigmoid", 0.1, 0, False)
    lp = torch.zeros(4, 5, device=device)
    with pytest.raises(ValueError, match="ref_logps"):
        preference_kernels.sequence_preference_forward(lp, lp > 0, lp[:2], "sigmoid", 0.1, 0, False)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_kernels.forward(lp[0], lp[1], lp[2], lp[3], "dpo", 0.1, 0.0)
