"""Triton KL estimators (kernels/kl.py) against a float64 oracle, forward and backward."""
import pytest
import torch

from oracle import grads64, kl64

from pyalign.kernels import kl as kl_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(shape, generator=gen) * 6
    # differences over many scales, tiny ones included (k3's cancellation regime)
    scales = 10.0 ** torch.randint(-4, 1, shape, generator=gen).to(torch.float32)
    ref_logprobs = logprobs + torch.randn(shape, generator=gen) * scales
    mask = torch.rand(shape, generator=gen) > 0.3
    grad_kl = torch.randn(shape, generator=gen)
    return (logprobs.to(dtype).to(device), ref_logprobs.to(dtype).to(device), mask.to(device),
            grad_kl.to(device))


def _oracle(logprobs, ref_logprobs, mask, estimator, grad_kl):
    """(kl, grad_logprobs, grad_ref_logprobs) in float64."""
    values, (grad, grad_ref) = grads64(lambda lp, ref: kl64(lp, ref, estimator, mask),
                                       [logprobs, ref_logprobs], grad_kl)
    return values, grad, grad_ref


def _grad_tol(dtype):
    return dict(rtol={torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype],
                atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", [(1,), (3, 700)])
def test_forward_backward_direct(shape, estimator, with_mask, dtype, device):
    logprobs, ref_logprobs, mask, grad_kl = _case(shape, dtype, device)
    mask = mask if with_mask else None
    exp_kl, exp_grad, exp_grad_ref = _oracle(logprobs, ref_logprobs, mask, estimator, grad_kl)
    kl = kl_kernels.forward(logprobs, ref_logprobs, mask, estimator)
    assert kl.dtype == torch.float32 and kl.shape == logprobs.shape
    # fp32 math on the same (rounded) inputs: tight for every dtype, tiny k3 values included
    torch.testing.assert_close(kl.double().cpu(), exp_kl.cpu(), rtol=1e-5, atol=1e-12)
    grad, grad_ref = kl_kernels.backward(grad_kl, logprobs, ref_logprobs, mask, estimator)
    assert grad.dtype == grad_ref.dtype == dtype
    torch.testing.assert_close(grad.double().cpu(), exp_grad.cpu(), **_grad_tol(dtype))
    torch.testing.assert_close(grad_ref.double().cpu(), exp_grad_ref.cpu(), **_grad_tol(dtype))


def test_masked_nan_does_not_leak(device):
    logprobs, ref_logprobs, mask, grad_kl = _case((2, 50), torch.float32, device, seed=1)
    logprobs[~mask] = float("nan")
    logprobs[0, 0], mask[0, 0] = float("nan"), True  # unmasked NaN propagates
    for estimator in ("k1", "k2", "k3"):
        kl = kl_kernels.forward(logprobs, ref_logprobs, mask, estimator)
        assert torch.all(kl[~mask] == 0) and torch.isnan(kl[0, 0])
        assert torch.isfinite(kl[mask][1:]).all()
        grad, grad_ref = kl_kernels.backward(grad_kl, logprobs, ref_logprobs, mask, estimator)
        assert torch.all(grad[~mask] == 0) and torch.all(grad_ref[~mask] == 0)


def test_mixed_dtypes_and_noncontiguous(device):
    logprobs, ref_logprobs, mask, grad_kl = _case((6, 40), torch.float32, device, seed=2)
    logprobs_t = logprobs.t()  # non-contiguous
    ref_bf16 = ref_logprobs.t().to(torch.bfloat16)
    exp_kl, exp_grad, exp_grad_ref = _oracle(logprobs_t, ref_bf16, None, "k3", grad_kl.t())
    kl = kl_kernels.forward(logprobs_t, ref_bf16, None, "k3")
    torch.testing.assert_close(kl.double().cpu(), exp_kl.cpu(), rtol=1e-5, atol=1e-12)
    grad, grad_ref = kl_kernels.backward(grad_kl.t(), logprobs_t, ref_bf16, None, "k3")
    assert grad.dtype == torch.float32 and grad_ref.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double().cpu(), exp_grad.cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ref.double().cpu(), exp_grad_ref.cpu(), rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_public_api_triton_backend(estimator, device):
    import pyalign
    logprobs, ref_logprobs, mask, grad_kl = _case((4, 33), torch.bfloat16, device, seed=3)
    leaf = logprobs.clone().requires_grad_(True)
    ref_leaf = ref_logprobs.clone().requires_grad_(True)
    kl = pyalign.kl_penalty(leaf, ref_leaf, estimator=estimator, mask=mask, backend="triton")
    (kl * grad_kl).sum().backward()
    exp_kl, exp_grad, exp_grad_ref = _oracle(logprobs, ref_logprobs, mask, estimator, grad_kl)
    torch.testing.assert_close(kl.double().cpu(), exp_kl.cpu(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(leaf.grad.double().cpu(), exp_grad.cpu(), **_grad_tol(torch.bfloat16))
    torch.testing.assert_close(ref_leaf.grad.double().cpu(), exp_grad_ref.cpu(),
                               **_grad_tol(torch.bfloat16))
