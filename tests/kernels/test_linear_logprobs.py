"""Triton fused linear + log-probs (kernels/linear_logprobs.py) against a float64 oracle:
log-probs, entropy and lse forward; d_hidden, d_weight, d_bias backward."""
import pytest
import torch

from oracle import entropy64, linear_logits64, token_logprobs64

from pyalign.kernels import linear_logprobs as linear_kernels

IGNORE = -100
SMALL_TILES = (16, 32, 16, 4)  # several V tiles and H steps on small shapes, partial last ones


def _oracle(hidden, weight, bias, labels, ignore_index, temperature, grad_logprobs,
            grad_entropy=None):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) in float64, by autograd."""
    leaves = [t.detach().double().requires_grad_(True)
              for t in ((hidden, weight) if bias is None else (hidden, weight, bias))]
    logits = linear_logits64(*leaves)
    logprobs = token_logprobs64(logits, labels, ignore_index, temperature)
    entropy = entropy64(logits, labels, ignore_index, temperature)
    objective = (logprobs * grad_logprobs.double()).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy.double()).sum()
    grads = torch.autograd.grad(objective, leaves)
    return (logprobs.detach(), entropy.detach(), grads[0], grads[1],
            grads[2] if bias is not None else None)


def _case(rows, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[0] = vocab - 1
    if rows > 3:
        labels[1], labels[2] = IGNORE, 0
    grad_logprobs = torch.randn(rows, generator=gen)
    grad_entropy = torch.randn(rows, generator=gen)
    return [t.to(device) for t in (hidden, weight, bias, labels, grad_logprobs, grad_entropy)]


def _grad_tol(dtype):
    # fp32: IEEE products, fp32 accumulation. bf16/fp16: d/dz is rounded to the input dtype for
    # the tensor-core matmuls (as eager does) and the results are rounded on output.
    # Sums over the vocabulary cancel: absolute tolerances scale with the gradient's largest entry.
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=5e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}[dtype]


def _close(actual, expected, tol):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tol["rtol"],
                               atol=tol["atol"] * scale)


def _check_all(outputs, expected, dtype, with_bias):
    (logprobs, entropy, _), (grad_hidden, grad_weight, grad_bias) = outputs
    exp_lp, exp_ent, exp_gh, exp_gw, exp_gb = expected
    fwd_tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logprobs.double().cpu(), exp_lp.cpu(), **fwd_tol)
    if entropy.numel():
        torch.testing.assert_close(entropy.double().cpu(), exp_ent.cpu(), **fwd_tol)
    assert grad_hidden.dtype == grad_weight.dtype == dtype
    _close(grad_hidden, exp_gh, _grad_tol(dtype))
    _close(grad_weight, exp_gw, _grad_tol(dtype))
    if with_bias:
        _close(grad_bias, exp_gb, _grad_tol(dtype))
    else:
        assert grad_bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias,with_entropy,temperature",
                         [(True, True, 0.8), (False, False, 1.0)])
def test_forward_backward_direct(dtype, with_bias, with_entropy, temperature, device):
    hidden, weight, bias, labels, grad_lp, grad_ent = _case(37, 48, 300, dtype, device)
    bias = bias if with_bias else None
    grad_ent = grad_ent if with_entropy else None
    expected = _oracle(hidden, weight, bias, labels, IGNORE, temperature,
                                              grad_lp, grad_ent)
    forward_out = linear_kernels.forward(hidden, weight, bias, labels, IGNORE, temperature,
                                         with_entropy, None, tiles=SMALL_TILES)
    logprobs, entropy, lse = forward_out
    backward_out = linear_kernels.backward(grad_lp, grad_ent, hidden, weight, bias, labels, lse,
                                           entropy if with_entropy else None, IGNORE, temperature,
                                           None, tiles=SMALL_TILES)
    _check_all((forward_out, backward_out), expected, dtype, with_bias)
    assert torch.all(backward_out[0][1] == 0), "ignored row must get zero d_hidden"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_tiles(dtype, device):
    hidden, weight, bias, labels, grad_lp, grad_ent = _case(70, 80, 200, dtype, device, seed=1)
    expected = _oracle(hidden, weight, bias, labels, IGNORE, 1.0, grad_lp,
                                              grad_ent)
    forward_out = linear_kernels.forward(hidden, weight, bias, labels, IGNORE, 1.0, True, None)
    backward_out = linear_kernels.backward(grad_lp, grad_ent, hidden, weight, bias, labels,
                                           forward_out[2], forward_out[1], IGNORE, 1.0, None)
    _check_all((forward_out, backward_out), expected, dtype, True)


def test_vocab_of_one_and_all_ignored(device):
    hidden, weight, bias, labels, grad_lp, grad_ent = _case(5, 16, 1, torch.float32, device, seed=2)
    labels = torch.zeros_like(labels)
    expected = _oracle(hidden, weight, bias, labels, IGNORE, 1.0, grad_lp,
                                              grad_ent)
    forward_out = linear_kernels.forward(hidden, weight, bias, labels, IGNORE, 1.0, True, None,
                                         tiles=SMALL_TILES)
    backward_out = linear_kernels.backward(grad_lp, grad_ent, hidden, weight, bias, labels,
                                           forward_out[2], forward_out[1], IGNORE, 1.0, None,
                                           tiles=SMALL_TILES)
    _check_all((forward_out, backward_out), expected, torch.float32, True)

    labels = torch.full_like(labels, IGNORE)
    logprobs, entropy, lse = linear_kernels.forward(hidden, weight, bias, labels, IGNORE, 1.0, True,
                                                    None, tiles=SMALL_TILES)
    assert torch.all(logprobs == 0) and torch.all(entropy == 0)
    grads = linear_kernels.backward(grad_lp, grad_ent, hidden, weight, bias, labels, lse, entropy,
                                    IGNORE, 1.0, None, tiles=SMALL_TILES)
    assert all(torch.all(g == 0) for g in grads)


def test_non_contiguous_inputs(device):
    hidden, weight, bias, labels, grad_lp, grad_ent = _case(20, 40, 100, torch.float32, device, seed=3)
    hidden_t = hidden.t().contiguous().t()           # column stride 20
    weight_sliced = torch.cat([weight, weight], 1)[:, 5:45]  # row stride 80
    expected = _oracle(hidden_t, weight_sliced, None, labels, IGNORE, 1.0,
                                              grad_lp)
    forward_out = linear_kernels.forward(hidden_t, weight_sliced, None, labels, IGNORE, 1.0, False,
                                         None, tiles=SMALL_TILES)
    backward_out = linear_kernels.backward(grad_lp, None, hidden_t, weight_sliced, None, labels,
                                           forward_out[2], None, IGNORE, 1.0, None,
                                           tiles=SMALL_TILES)
    _check_all((forward_out, backward_out), expected, torch.float32, False)


def test_public_api_triton_backend(device):
    import pyalign
    hidden, weight, bias, labels, grad_lp, grad_ent = _case(12, 32, 90, torch.float32, device, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logprobs, entropy = pyalign.linear_token_logprobs(
        leaves[0].view(3, 4, 32), leaves[1], labels.view(3, 4), bias=leaves[2], entropy=True,
        temperature=1.1, backend="triton")
    ((logprobs.reshape(-1) * grad_lp).sum() + (entropy.reshape(-1) * grad_ent).sum()).backward()
    exp_lp, exp_ent, exp_gh, exp_gw, exp_gb = _oracle(
        hidden, weight, bias, labels, IGNORE, 1.1, grad_lp, grad_ent)
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logprobs.reshape(-1).double().cpu(), exp_lp.cpu(), **tol)
    torch.testing.assert_close(entropy.reshape(-1).double().cpu(), exp_ent.cpu(), **tol)
    for leaf, expected in zip(leaves, (exp_gh, exp_gw, exp_gb)):
        _close(leaf.grad, expected, _grad_tol(torch.float32))
