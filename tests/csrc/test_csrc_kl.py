"""csrc/cpu/kl.cpp: per-token KL estimators k1/k2/k3 forward and backward on the CPU backend,
against the float64 oracle, directly and through pyalign.kl_penalty(backend="cpu")."""
import math

import pytest
import torch

import pyalign
from oracle import grads64, kl64
from testutil import poison_

ESTIMATORS = ["k1", "k2", "k3"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]



def make_inputs(shape, dtype, spread=1.0):
    logprobs = (-torch.rand(shape) * 5).to(dtype)
    ref_logprobs = (logprobs.float() + torch.randn(shape) * spread).to(dtype)
    return logprobs, ref_logprobs


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1,), (3, 1001)])
def test_kl_forward_backward_vs_oracle(cpu_ops, estimator, dtype, masked, shape):
    logprobs, ref_logprobs = make_inputs(shape, dtype)
    mask = torch.rand(shape) > 0.3 if masked else None
    grad_kl = torch.randn(shape)
    expected, (grad_lp64, grad_ref64) = grads64(
        lambda lp, rf: kl64(lp, rf, estimator, mask), [logprobs, ref_logprobs], grad_kl)

    kl = poison_(torch.empty(shape))
    cpu_ops.kl_forward_out(logprobs, ref_logprobs, mask, estimator, kl)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(cpu_ops.kl_forward(logprobs, ref_logprobs, mask, estimator), kl)

    grad_lp = poison_(torch.empty(shape, dtype=dtype))
    grad_ref = poison_(torch.empty(shape, dtype=dtype))
    cpu_ops.kl_backward_out(grad_kl, logprobs, ref_logprobs, mask, estimator, grad_lp, grad_ref)
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_lp.double(), grad_lp64, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grad_ref.double(), grad_ref64, rtol=rtol, atol=1e-7)
    if masked:
        assert torch.all(kl[~mask] == 0) and torch.all(grad_lp[~mask] == 0)


def test_k3_small_differences_keep_full_precision(cpu_ops):
    """k3 = e^d - d - 1 ~ d^2/2 cancels in fp32; the kernel still gets fp32 relative accuracy."""
    logprobs = -torch.rand(1000) * 3
    ref_logprobs = logprobs + torch.randn(1000) * 1e-4
    ref_logprobs = torch.where(ref_logprobs == logprobs, logprobs + 1e-4, ref_logprobs)
    diff = ref_logprobs.double() - logprobs.double()
    expected = torch.expm1(diff) - diff  # the oracle's e^d - d - 1 itself cancels at d ~ 1e-5
    kl = cpu_ops.kl_forward(logprobs, ref_logprobs, None, "k3")
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_public_api_cpu_backend(cpu_ops, estimator):
    logprobs, ref_logprobs = make_inputs((4, 33), torch.float32)
    mask = torch.rand(4, 33) > 0.5
    grad_kl = torch.randn(4, 33)
    expected, (grad_lp64, grad_ref64) = grads64(
        lambda lp, rf: kl64(lp, rf, estimator, mask), [logprobs, ref_logprobs], grad_kl)
    lp_leaf = logprobs.clone().requires_grad_(True)
    ref_leaf = ref_logprobs.clone().requires_grad_(True)
    kl = pyalign.kl_penalty(lp_leaf, ref_leaf, estimator=estimator, mask=mask, backend="cpu")
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=1e-7)
    (kl * grad_kl).sum().backward()
    torch.testing.assert_close(lp_leaf.grad.double(), grad_lp64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ref_leaf.grad.double(), grad_ref64, rtol=1e-6, atol=1e-7)


def test_nan_propagates_and_bad_input_raises(cpu_ops):
    logprobs, ref_logprobs = make_inputs((10,), torch.float32)
    logprobs[3] = math.nan
    for estimator in ESTIMATORS:
        kl = cpu_ops.kl_forward(logprobs, ref_logprobs, None, estimator)
        assert torch.isnan(kl[3]) and torch.isfinite(kl[[0, 1, 2, 4]]).all()
    with pytest.raises(RuntimeError, match="k1, k2 or k3"):
        cpu_ops.kl_forward(logprobs, ref_logprobs, None, "k4")
    with pytest.raises(RuntimeError, match="shape"):
        cpu_ops.kl_forward(logprobs, ref_logprobs[:5], None, "k1")
    with pytest.raises(RuntimeError, match="bool"):
        cpu_ops.kl_forward(logprobs, ref_logprobs, torch.ones(10), "k1")
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_ops.kl_forward(logprobs.double(), ref_logprobs, None, "k1")


def test_thread_count_does_not_change_results(cpu_ops, threads):
    logprobs, ref_logprobs = make_inputs((200_000,), torch.float32)
    grad_kl = torch.randn(200_000)

    def run():
        return (cpu_ops.kl_forward(logprobs, ref_logprobs, None, "k3"),
                *cpu_ops.kl_backward(grad_kl, logprobs, ref_logprobs, None, "k3"))

    for a, b in zip(threads(1, run), threads(2, run)):
        assert torch.equal(a, b)
