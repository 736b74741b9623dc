"""pyalign.kl_penalty (k1, k2, k3 per token, optional mask) on every backend of the test device
(support.backends_for) against float64: values and gradients for both inputs, differences over
many scales (k3's cancellation regime), NaN under the mask, mixed dtypes and non-contiguous
inputs, and results independent of the thread count."""
import pytest
import torch

import pyalign
from support import backends_for, grads64, kl64, same_under_thread_counts

BACKENDS = backends_for("kl")
# The backends whose work splits over torch's intra-op threads (the Triton kernels' does not).
THREADED = [b for b in BACKENDS if b in ("eager", "cpu")]
ESTIMATORS = ["k1", "k2", "k3"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one element, a partial block, 3-D (a view), several blocks with a partial last one
SHAPES = [(1,), (2, 5, 33), (3, 1001)]


def random_logprobs(shape, dtype):
    """Log-probs of sampled tokens (negative) for the policy and a nearby reference."""
    logprobs = -torch.rand(shape) * 4
    ref_logprobs = logprobs + torch.randn(shape) * 0.7
    return logprobs.to(dtype), ref_logprobs.to(dtype)


def run(logprobs, ref_logprobs, upstream, **kwargs):
    leaves = [logprobs.clone().requires_grad_(True), ref_logprobs.clone().requires_grad_(True)]
    kl = pyalign.kl_penalty(*leaves, **kwargs)
    kl.backward(upstream)
    return kl.detach(), leaves[0].grad, leaves[1].grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_grads_match_float64(backend, estimator, masked, dtype, shape):
    logprobs, ref_logprobs = random_logprobs(shape, dtype)
    mask = torch.rand(shape) > 0.3 if masked else None
    upstream = torch.randn(shape)
    kl, grad_logprobs, grad_ref = run(logprobs, ref_logprobs, upstream, estimator=estimator,
                                      mask=mask, backend=backend)
    expected, (exp_grad_logprobs, exp_grad_ref) = grads64(
        lambda lp, ref: kl64(lp, ref, estimator, mask), [logprobs, ref_logprobs], upstream)
    assert kl.dtype == torch.float32 and kl.shape == shape
    # the inputs are what they are (rounded to dtype): fp32 math on them is 1e-5-exact
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    assert grad_logprobs.dtype == grad_ref.dtype == dtype
    torch.testing.assert_close(grad_logprobs.double(), exp_grad_logprobs, **grad_tol)
    torch.testing.assert_close(grad_ref.double(), exp_grad_ref, **grad_tol)
    if masked:
        assert torch.all(kl[~mask] == 0)
        assert torch.all(grad_logprobs[~mask] == 0) and torch.all(grad_ref[~mask] == 0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_float64(estimator):
    logprobs = (-torch.rand(6, dtype=torch.float64) * 3).requires_grad_(True)
    ref_logprobs = (logprobs.detach() + torch.randn(6, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([True, True, False, True, False, True])
    assert torch.autograd.gradcheck(
        lambda lp, ref: pyalign.kl_penalty(lp, ref, estimator=estimator, mask=mask),
        (logprobs, ref_logprobs))
    kl = pyalign.kl_penalty(logprobs, ref_logprobs, estimator=estimator, mask=mask)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, kl64(logprobs, ref_logprobs, estimator, mask),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_is_non_negative_and_k1_k2_k3_agree_near_zero(backend):
    logprobs, ref_logprobs = random_logprobs((1000,), torch.float32)
    k3 = pyalign.kl_penalty(logprobs, ref_logprobs, estimator="k3", backend=backend)
    assert torch.all(k3 >= 0)
    close_ref = logprobs + 1e-3 * torch.randn(1000)
    k2 = pyalign.kl_penalty(logprobs, close_ref, estimator="k2", backend=backend)
    k3 = pyalign.kl_penalty(logprobs, close_ref, estimator="k3", backend=backend)
    torch.testing.assert_close(k3, k2, rtol=2e-3, atol=1e-9)  # k3 = d^2/2 + O(d^3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_integer_mask(backend):
    """fp32 policy log-probs against a bf16 reference; a 0/1 integer mask."""
    logprobs, ref_logprobs = random_logprobs((4, 9), torch.float32)
    ref_logprobs = ref_logprobs.to(torch.bfloat16)
    mask = (torch.rand(4, 9) > 0.5).to(torch.int64)
    upstream = torch.randn(4, 9)
    kl, grad_logprobs, grad_ref = run(logprobs, ref_logprobs, upstream, estimator="k3", mask=mask,
                                      backend=backend)
    expected, (exp_grad_logprobs, exp_grad_ref) = grads64(
        lambda lp, ref: kl64(lp, ref, "k3", mask.bool()), [logprobs, ref_logprobs], upstream)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    assert grad_logprobs.dtype == torch.float32 and grad_ref.dtype == torch.bfloat16
    torch.testing.assert_close(grad_logprobs.double(), exp_grad_logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ref.double(), exp_grad_ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty(backend, estimator):
    logprobs = torch.empty(0, 5, requires_grad=True)
    kl = pyalign.kl_penalty(logprobs, torch.empty(0, 5), estimator=estimator, backend=backend)
    assert kl.shape == (0, 5)
    kl.sum().backward()
    assert logprobs.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_stays_at_its_position(backend, estimator):
    logprobs, ref_logprobs = random_logprobs((8,), torch.float32)
    logprobs[3] = float("nan")
    kl, grad_logprobs, grad_ref = run(logprobs, ref_logprobs, torch.ones(8), estimator=estimator,
                                      backend=backend)
    assert torch.isnan(kl[3])
    others = torch.arange(8) != 3
    torch.testing.assert_close(kl[others].double(), kl64(logprobs, ref_logprobs, estimator)[others],
                               rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad_logprobs[others]).all() and torch.isfinite(grad_ref[others]).all()
    if estimator != "k1":  # k1's gradient (-1, +1) does not depend on the values
        assert torch.isnan(grad_logprobs[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_is_accurate_where_expm1_minus_d_cancels(backend):
    # |d| from 1e-6 to 2, both signs, around the series/direct switch too: in fp32,
    # expm1(d) - d loses most digits for tiny |d|; pyalign's k3 must stay at fp32 accuracy.
    magnitudes = torch.logspace(-6, 0.3, 200)
    diff = torch.cat([magnitudes, -magnitudes, torch.tensor([0.4999, 0.5001, -0.4999, -0.5001])])
    logprobs = -torch.rand(diff.shape) * 5
    ref_logprobs = logprobs + diff
    kl = pyalign.kl_penalty(logprobs, ref_logprobs, estimator="k3", backend=backend)
    exact = kl64(logprobs, ref_logprobs, "k3")
    torch.testing.assert_close(kl.double(), exact, rtol=2e-5, atol=0)


def multiscale_case(shape):
    """Differences from 1e-4 to 1 (tiny ones are where k3 = e^d - d - 1 cancels), a mask and an
    upstream gradient."""
    logprobs = -torch.rand(shape) * 6
    scales = 10.0 ** torch.randint(-4, 1, shape).to(torch.float32)
    ref_logprobs = logprobs + torch.randn(shape) * scales
    return logprobs, ref_logprobs, torch.rand(shape) > 0.3, torch.randn(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_differences_over_many_scales(backend, estimator, dtype):
    logprobs, ref_logprobs, mask, upstream = multiscale_case((3, 700))
    logprobs, ref_logprobs = logprobs.to(dtype), ref_logprobs.to(dtype)
    kl, grad_logprobs, grad_ref = run(logprobs, ref_logprobs, upstream, estimator=estimator,
                                      mask=mask, backend=backend)
    expected, (exp_grad, exp_grad_ref) = grads64(
        lambda lp, ref: kl64(lp, ref, estimator, mask), [logprobs, ref_logprobs], upstream)
    # fp32 math on the same (rounded) inputs: tight for every dtype, tiny k3 values included
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-12)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(grad_logprobs.double(), exp_grad, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grad_ref.double(), exp_grad_ref, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_nan_does_not_leak(backend, estimator):
    logprobs, ref_logprobs, mask, upstream = multiscale_case((2, 50))
    logprobs[~mask] = float("nan")
    logprobs[0, 0], mask[0, 0] = float("nan"), True  # an unmasked NaN propagates
    kl, grad_logprobs, grad_ref = run(logprobs, ref_logprobs, upstream, estimator=estimator,
                                      mask=mask, backend=backend)
    assert torch.all(kl[~mask] == 0) and torch.isnan(kl[0, 0])
    assert torch.isfinite(kl[mask][1:]).all()
    assert torch.all(grad_logprobs[~mask] == 0) and torch.all(grad_ref[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_non_contiguous(backend):
    logprobs, ref_logprobs, _, upstream = multiscale_case((6, 40))
    logprobs_t = logprobs.t()  # non-contiguous
    ref_bf16 = ref_logprobs.t().to(torch.bfloat16)
    assert not logprobs_t.is_contiguous()
    kl, grad_logprobs, grad_ref = run(logprobs_t, ref_bf16, upstream.t(), estimator="k3",
                                      backend=backend)
    expected, (exp_grad, exp_grad_ref) = grads64(lambda lp, ref: kl64(lp, ref, "k3"),
                                                 [logprobs_t, ref_bf16], upstream.t())
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-12)
    assert grad_logprobs.dtype == torch.float32 and grad_ref.dtype == torch.bfloat16
    torch.testing.assert_close(grad_logprobs.double(), exp_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ref.double(), exp_grad_ref, rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize("backend", THREADED)
def test_thread_count_does_not_change_results(backend):
    logprobs, ref_logprobs = random_logprobs((200_000,), torch.float32)
    upstream = torch.randn(200_000)
    same_under_thread_counts(lambda: run(logprobs, ref_logprobs, upstream, estimator="k3",
                                         backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_small_differences_keep_full_precision(backend):
    """k3 = e^d - d - 1 ~ d^2/2 cancels in fp32 at |d| ~ 1e-4; pyalign keeps fp32 relative
    accuracy there."""
    logprobs = -torch.rand(1000) * 3
    ref_logprobs = logprobs + torch.randn(1000) * 1e-4
    ref_logprobs = torch.where(ref_logprobs == logprobs, logprobs + 1e-4, ref_logprobs)
    diff = ref_logprobs.double() - logprobs.double()
    kl = pyalign.kl_penalty(logprobs, ref_logprobs, estimator="k3", backend=backend)
    torch.testing.assert_close(kl.double(), torch.expm1(diff) - diff, rtol=1e-6, atol=0)
