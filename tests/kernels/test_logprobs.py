"""Triton per-token log-probs (kernels/logprobs.py) against a float64 oracle, forward and backward.

Direct launches exercise block sizes smaller than V (several loop iterations, a partial last
block); public-API calls (pyalign.token_logprobs(..., backend="triton")) exercise the wiring.
"""
import pytest
import torch

from oracle import token_logprobs_and_grad64

from pyalign.kernels import logprobs as logprobs_kernels

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, vocab, block_v override): V = 1; V not a multiple of the block (several iterations);
# one partial default block; several default-size blocks.
SHAPES = [(5, 1, None), (7, 300, 64), (4, 1500, None), (3, 2500, 1024)]


def _tolerances(dtype):
    # Forward math is fp32 on the (rounded) input, so it matches float64 of the same input
    # closely for every dtype; gradients are rounded to the logits' dtype on store.
    grad_rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    return dict(rtol=1e-5, atol=2e-5), dict(rtol=grad_rtol, atol=1e-6)


def _case(rows, vocab, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * rows + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[0] = vocab - 1
    if rows > 2:
        labels[1] = IGNORE
        labels[2] = 0
    if vocab > 8 and rows > 3:
        # masked vocabulary: a few -inf logits (never at the label)
        logits[3, 1:6] = float("-inf")
        labels[3] = 7
    return logits.to(device), labels.to(device), gen


def _oracle(logits, labels, ignore_index, temperature, grad_logprobs, grad_entropy=None):
    return token_logprobs_and_grad64(logits, labels, grad_logprobs, grad_entropy, ignore_index,
                                     temperature)


def _check(actual, expected, tol):
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,block_v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_direct(rows, vocab, block_v, dtype, temperature, device):
    logits, labels, gen = _case(rows, vocab, dtype, device)
    grad_logprobs = torch.randn(rows, generator=gen).to(device)
    grad_entropy = torch.randn(rows, generator=gen).to(device)
    fwd_tol, grad_tol = _tolerances(dtype)
    exp_lp, exp_ent, exp_grad = _oracle(logits, labels, IGNORE, temperature,
                                                        grad_logprobs, grad_entropy)

    logprobs, entropy, lse = logprobs_kernels.forward(logits, labels, IGNORE, temperature, True,
                                                      block_v=block_v)
    assert logprobs.dtype == entropy.dtype == lse.dtype == torch.float32
    _check(logprobs, exp_lp, fwd_tol)
    _check(entropy, exp_ent, fwd_tol)
    valid = labels != IGNORE
    exp_lse = torch.logsumexp(logits.double() / temperature, -1)
    _check(lse[valid], exp_lse[valid], fwd_tol)

    grad = logprobs_kernels.backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                     IGNORE, temperature, False, block_v=block_v)
    assert grad.dtype == dtype and grad.shape == logits.shape
    _check(grad, exp_grad, grad_tol)
    if rows > 2:
        assert torch.all(grad[1] == 0), "ignored row must get exactly zero gradient"
    if vocab > 8 and rows > 3:
        assert torch.all(grad[3, 1:6] == 0), "-inf logits must get zero gradient, not NaN"

    # without entropy: same log-probs, gradient of the log-prob term only
    logprobs2, entropy2, lse2 = logprobs_kernels.forward(logits, labels, IGNORE, temperature,
                                                         False, block_v=block_v)
    assert entropy2.numel() == 0
    _check(logprobs2, exp_lp, fwd_tol)
    _, _, exp_grad_lp = _oracle(logits, labels, IGNORE, temperature,
                                                grad_logprobs)
    grad2 = logprobs_kernels.backward(grad_logprobs, None, logits, labels, lse2, None, IGNORE,
                                      temperature, False, block_v=block_v)
    _check(grad2, exp_grad_lp, grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_into_logits(dtype, device):
    logits, labels, gen = _case(6, 300, dtype, device, seed=1)
    grad_logprobs = torch.randn(6, generator=gen).to(device)
    grad_entropy = torch.randn(6, generator=gen).to(device)
    _, _, exp_grad = _oracle(logits, labels, IGNORE, 1.3, grad_logprobs,
                                             grad_entropy)
    lp, ent, lse = logprobs_kernels.forward(logits, labels, IGNORE, 1.3, True, block_v=128)
    buffer = logits.clone()
    grad = logprobs_kernels.backward(grad_logprobs, grad_entropy, buffer, labels, lse, ent, IGNORE,
                                     1.3, True, block_v=128)
    assert grad.data_ptr() == buffer.data_ptr()
    _check(buffer, exp_grad, _tolerances(dtype)[1])


def test_all_rows_ignored(device):
    logits, _, gen = _case(4, 300, torch.float32, device)
    labels = torch.full((4,), IGNORE, device=device)
    lp, ent, lse = logprobs_kernels.forward(logits, labels, IGNORE, 1.0, True, block_v=64)
    assert torch.all(lp == 0) and torch.all(ent == 0)
    grad = logprobs_kernels.backward(torch.randn(4, generator=gen).to(device),
                                     torch.randn(4, generator=gen).to(device), logits, labels,
                                     lse, ent, IGNORE, 1.0, False, block_v=64)
    assert torch.all(grad == 0)


def test_non_contiguous_logits(device):
    base, labels, gen = _case(5, 600, torch.float32, device, seed=2)
    row_strided = base[:, 100:400]          # row stride 600, column stride 1
    labels = labels % 300
    col_strided = base.t().contiguous().t()[:, :300]  # column stride 5 (copied by the wrapper)
    grad_logprobs = torch.randn(5, 2, generator=gen).to(device)[:, 0]  # strided upstream grad
    for logits in (row_strided, col_strided):
        exp_lp, exp_ent, exp_grad = _oracle(logits, labels, IGNORE, 1.0,
                                                            grad_logprobs)
        lp, ent, lse = logprobs_kernels.forward(logits, labels, IGNORE, 1.0, True, block_v=128)
        _check(lp, exp_lp, _tolerances(torch.float32)[0])
        _check(ent, exp_ent, _tolerances(torch.float32)[0])
        grad = logprobs_kernels.backward(grad_logprobs, None, logits, labels, lse, None, IGNORE,
                                         1.0, False, block_v=128)
        _check(grad, exp_grad, _tolerances(torch.float32)[1])


def test_nan_propagates_to_its_row_only(device):
    logits, labels, _ = _case(4, 300, torch.float32, device, seed=3)
    labels[1] = 5
    logits[2, 17] = float("nan")
    lp, ent, lse = logprobs_kernels.forward(logits, labels, IGNORE, 1.0, True, block_v=64)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3]]).all() and torch.isfinite(ent[[0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_triton_backend(dtype, device):
    import pyalign
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 3, 700, generator=gen) * 2).to(dtype).to(device)
    labels = torch.randint(0, 700, (2, 3), generator=gen).to(device)
    labels[1, 2] = IGNORE
    grad_logprobs = torch.randn(2, 3, generator=gen).to(device)
    grad_entropy = torch.randn(2, 3, generator=gen).to(device)
    leaf = logits.clone().requires_grad_(True)
    lp, ent = pyalign.token_logprobs(leaf, labels, temperature=0.9, entropy=True, backend="triton")
    ((lp * grad_logprobs).sum() + (ent * grad_entropy).sum()).backward()
    exp_lp, exp_ent, exp_grad = _oracle(
        logits.reshape(6, 700), labels.reshape(6), IGNORE, 0.9, grad_logprobs.reshape(6),
        grad_entropy.reshape(6))
    fwd_tol, grad_tol = _tolerances(dtype)
    _check(lp.reshape(6), exp_lp, fwd_tol)
    _check(ent.reshape(6), exp_ent, fwd_tol)
    _check(leaf.grad.reshape(6, 700), exp_grad, grad_tol)

    # upstream gradient from .sum(): a stride-0 expanded vector reaches the kernel
    leaf.grad = None
    pyalign.token_logprobs(leaf, labels, backend="triton").sum().backward()
    _, _, exp_grad_sum = _oracle(logits.reshape(6, 700), labels.reshape(6), IGNORE,
                                                 1.0, torch.ones(6))
    _check(leaf.grad.reshape(6, 700), exp_grad_sum, grad_tol)
