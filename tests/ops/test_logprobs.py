"""pyalign.token_logprobs through the public API, on every backend of the test device
(support.backends_for: on CPU eager, cpu and triton in its interpreter; on a GPU triton and
eager), against float64.

Forward values, entropy and gradients come from the oracles of tests/support.py (float64
autograd through the formulas of docs/algorithms.md), on fresh random inputs with random
upstream grads. Triton output buffers start NaN-filled (tests/ops/conftest.py). Also: the
Triton block loop (several blocks, a partial last one), in-place backward writing into the
logits, stride-0 and strided upstream gradients, and results independent of the thread count.
"""
import math

import pytest
import torch

import pyalign
from support import (
    DEVICE,
    IGNORE,
    backend_cases,
    backends_for,
    random_logits_labels,
    same_under_thread_counts,
    token_logprobs64,
    token_logprobs_and_grad64,
)

BACKENDS = backends_for("logprobs")
# The backends whose work splits over torch's intra-op threads (the Triton kernels' does not).
THREADED = [b for b in BACKENDS if b in ("eager", "cpu")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# logits shapes [..., V]: V = 1; a tiny odd V with two leading dims; V = 1000; and the large
# vocabularies (Llama 2 / Llama 3) with few rows.
SHAPES = [(5, 1), (3, 4, 7), (6, 1000), (3, 32000), (2, 128256)]
# The Triton interpreter is slow: small rows, but every path of the kernels' block loop (V = 1;
# one partial block of 1024; one partial block of 4096; three blocks of 4096, the last partial).
TRITON_SHAPES = [(5, 1), (3, 4, 7), (7, 300), (4, 1500), (3, 9000)]

FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
# Gradients are rounded to the logits' dtype on store (relative), after fp32 math whose absolute
# error scales with the row's upstream gradient (g * (1 - p) cancels at the label).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_case(shape, dtype, scale=3.0):
    """Random logits and labels with labels at 0 and V-1 and scattered ignore_index."""
    return random_logits_labels(shape, dtype, scale)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def close_grad(actual, expected, dtype, grad_logprobs, grad_entropy=None, temperature=1.0):
    """|actual - expected| <= rtol |expected| + 1e-6 * (|g_logprobs| + |g_entropy|) / T per row
    (plus fp16's subnormal spacing)."""
    scale = grad_logprobs.double().abs()
    if grad_entropy is not None:
        scale = scale + grad_entropy.double().abs()
    atol = 1e-6 * scale[..., None] / temperature + (6e-8 if dtype == torch.float16 else 0.0)
    error = (actual.double() - expected.double()).abs()
    bound = GRAD_RTOL[dtype] * expected.double().abs() + atol
    worst = (error - bound).max() if error.numel() else torch.tensor(0.0)
    assert worst <= 0, (f"gradient off by {float(error.max()):.3g} (bound exceeded by "
                        f"{float(worst):.3g}); dtype {dtype}")


def run(logits, labels, grad_logprobs, grad_entropy, **kwargs):
    """Forward with entropy and backward with the given upstream grads; returns values and grad."""
    leaf = logits.detach().clone().requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(leaf, labels, entropy=True, **kwargs)
    torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
    return logprobs.detach(), entropy.detach(), leaf.grad


@pytest.mark.parametrize("backend,shape", backend_cases("logprobs", [(s,) for s in SHAPES],
                                                        [(s,) for s in TRITON_SHAPES]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropy_and_grads_match_float64(backend, dtype, shape, temperature):
    logits, labels = random_case(shape, dtype)
    grad_logprobs = torch.randn(shape[:-1])
    grad_entropy = torch.randn(shape[:-1])
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy,
                                  temperature=temperature, backend=backend)
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy, temperature=temperature)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == labels.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    close(logprobs, exp_lp, **FORWARD_TOL)
    close(entropy, exp_ent, **FORWARD_TOL)
    close_grad(grad, exp_grad, dtype, grad_logprobs, grad_entropy, temperature)
    ignored = labels == IGNORE
    assert torch.all(logprobs[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_one_output_used(backend, used):
    """Backward through only one of the two outputs (the other's grad is absent)."""
    logits, labels = random_case((6, 37), torch.float32)
    leaf = logits.clone().requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(leaf, labels, entropy=True, backend=backend)
    upstream = torch.randn(6)
    (logprobs if used == "logprobs" else entropy).backward(upstream)
    zeros = torch.zeros(6)
    grads = (upstream, zeros) if used == "logprobs" else (zeros, upstream)
    _, _, exp_grad = token_logprobs_and_grad64(logits, labels, *grads)
    close_grad(leaf.grad, exp_grad, torch.float32, *grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy_returns_logprobs_only(backend):
    logits, labels = random_case((2, 3, 50), torch.bfloat16)
    leaf = logits.clone().requires_grad_(True)
    logprobs = pyalign.token_logprobs(leaf, labels, backend=backend)
    assert isinstance(logprobs, torch.Tensor) and logprobs.shape == (2, 3)
    upstream = torch.randn(2, 3)
    logprobs.backward(upstream)
    exp_lp, _, exp_grad = token_logprobs_and_grad64(logits, labels, upstream)
    close(logprobs, exp_lp, **FORWARD_TOL)
    close_grad(leaf.grad, exp_grad, torch.bfloat16, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    logits, labels = random_case((5, 40), torch.float32)
    expected = pyalign.token_logprobs(logits, labels, backend=backend)
    actual = pyalign.token_logprobs(logits, labels.to(torch.int32), backend=backend)
    assert torch.equal(actual, expected)


def test_gradcheck_float64():
    """The eager backend computes in float64 for float64 inputs: its hand-written backward
    (logprobs and entropy, temperature, ignored rows) against finite differences."""
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 2])

    def logprobs_and_entropy(x):
        return pyalign.token_logprobs(x, labels, entropy=True, temperature=0.7)

    assert torch.autograd.gradcheck(logprobs_and_entropy, (logits,))
    logprobs, entropy = logprobs_and_entropy(logits)
    assert logprobs.dtype == torch.float64
    exp_lp, exp_ent, _ = token_logprobs_and_grad64(logits, labels, torch.ones(5), temperature=0.7)
    close(logprobs, exp_lp, rtol=1e-12, atol=1e-12)
    close(entropy, exp_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_masked_vocabulary(backend, dtype, temperature):
    """-inf logits (masked vocabulary) away from the label: finite values, zero grad there."""
    logits, labels = random_case((4, 300), dtype)
    labels[:] = torch.tensor([0, 150, 299, 7])
    masked = torch.zeros(4, 300, dtype=torch.bool)
    masked[0, 1:200] = True
    masked[1, ::2] = True  # every even id, the label 150 is even: unmask it below
    masked[1, 150] = False
    masked[2, :299] = True  # only the label survives: logprob 0, entropy 0
    masked[3, 100:] = True
    logits = logits.masked_fill(masked, float("-inf"))
    grad_logprobs, grad_entropy = torch.randn(4), torch.randn(4)
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy,
                                  temperature=temperature, backend=backend)
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy, temperature=temperature)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(grad).all()
    close(logprobs, exp_lp, **FORWARD_TOL)
    close(entropy, exp_ent, **FORWARD_TOL)
    close_grad(grad, exp_grad, dtype, grad_logprobs, grad_entropy, temperature)
    assert torch.all(grad[masked] == 0)
    assert logprobs[2] == 0 and entropy[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_label_gives_minus_inf_and_no_nan_grad(backend, dtype):
    logits, labels = random_case((3, 64), dtype)
    labels[:] = torch.tensor([5, 9, 63])
    logits[1, 9] = float("-inf")
    logits[1, 30:40] = float("-inf")
    grad_logprobs, grad_entropy = torch.randn(3), torch.randn(3)
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy, backend=backend)
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy)
    assert logprobs[1] == -math.inf
    assert torch.isfinite(logprobs[[0, 2]]).all()
    assert not torch.isnan(grad).any() and not torch.isnan(entropy).any()
    close(logprobs, exp_lp, **FORWARD_TOL)
    close(entropy, exp_ent, **FORWARD_TOL)
    close_grad(grad, exp_grad, dtype, grad_logprobs, grad_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 33), (0, 33), (2, 0, 33), (3, 2, 1)], ids=str)
def test_all_ignored_and_empty_give_zeros_and_zero_grad(backend, shape):
    logits = torch.randn(shape) * 2
    labels = torch.full(shape[:-1], IGNORE)
    logits.requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(logits, labels, entropy=True, backend=backend)
    assert logprobs.shape == entropy.shape == labels.shape
    assert torch.all(logprobs == 0) and torch.all(entropy == 0)
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, labels = random_case((6, 20), torch.float32)
    labels[labels == IGNORE] = -1
    labels[2] = -1
    logprobs = pyalign.token_logprobs(logits, labels, ignore_index=-1, backend=backend)
    expected, _, _ = token_logprobs_and_grad64(logits, labels, torch.ones(6), ignore_index=-1)
    assert torch.all(logprobs[labels == -1] == 0)
    close(logprobs, expected, **FORWARD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced_vocab", "strided_rows"])
def test_non_contiguous_logits(backend, view):
    vocab = 97
    if view == "transposed":  # [V, N] storage read as [N, V]: stride(-1) != 1
        base = torch.randn(vocab, 6) * 3
        make = lambda b: b.t()  # noqa: E731
    elif view == "sliced_vocab":  # a [B, T, V] view into a wider buffer: rows of stride V + 11
        base = torch.randn(2, 3, vocab + 11) * 3
        make = lambda b: b[..., 5:5 + vocab]  # noqa: E731
    else:  # every other row of a buffer
        base = torch.randn(12, vocab) * 3
        make = lambda b: b[::2]  # noqa: E731
    logits = make(base)
    assert not logits.is_contiguous()
    labels = torch.randint(0, vocab, logits.shape[:-1])
    labels.view(-1)[1] = IGNORE
    grad_logprobs = torch.randn(labels.shape)
    grad_entropy = torch.randn(labels.shape)
    base_leaf = base.clone().requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(make(base_leaf), labels, entropy=True,
                                               temperature=1.3, backend=backend)
    torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy, temperature=1.3)
    close(logprobs, exp_lp, **FORWARD_TOL)
    close(entropy, exp_ent, **FORWARD_TOL)
    close_grad(make(base_leaf.grad), exp_grad, torch.float32, grad_logprobs, grad_entropy, 1.3)
    outside_view = torch.ones_like(base, dtype=torch.bool)
    make(outside_view).fill_(False)
    assert torch.all(base_leaf.grad[outside_view] == 0)
    assert torch.equal(base_leaf.detach(), base)  # the caller's buffer is not written


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_matches_out_of_place(backend, dtype):
    """inplace_backward=True reuses the logits buffer for the gradient: the same gradients reach
    the inputs of the layer that produced the logits."""
    rows, hidden_size, vocab = 12, 16, 301
    hidden = torch.randn(rows, hidden_size).to(dtype)
    head = (torch.randn(vocab, hidden_size) / 2).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[4] = IGNORE
    grad_logprobs, grad_entropy = torch.randn(rows), torch.randn(rows)
    grads = {}
    for inplace in (False, True):
        hidden_leaf = hidden.clone().requires_grad_(True)
        head_leaf = head.clone().requires_grad_(True)
        logits = hidden_leaf @ head_leaf.t()
        logprobs, entropy = pyalign.token_logprobs(logits, labels, entropy=True, temperature=0.8,
                                                   backend=backend, inplace_backward=inplace)
        torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
        grads[inplace] = (hidden_leaf.grad, head_leaf.grad)
    assert torch.equal(grads[True][0], grads[False][0])
    assert torch.equal(grads[True][1], grads[False][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_a_leaf(backend):
    logits, labels = random_case((5, 70), torch.float32)
    upstream = torch.randn(5)
    out_of_place = logits.clone().requires_grad_(True)
    pyalign.token_logprobs(out_of_place, labels, backend=backend).backward(upstream)
    in_place = logits.clone().requires_grad_(True)
    pyalign.token_logprobs(in_place, labels, backend=backend,
                           inplace_backward=True).backward(upstream)
    assert torch.equal(in_place.grad, out_of_place.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_stays_in_its_row(backend, dtype):
    logits, labels = random_case((5, 129), dtype)
    labels[2] = 17
    logits[2, 40] = float("nan")
    grad_logprobs, grad_entropy = torch.randn(5), torch.randn(5)
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy, backend=backend)
    assert torch.isnan(logprobs[2])
    assert torch.isnan(entropy[2]), f"entropy of a NaN row is {float(entropy[2])}, not NaN"
    others = [0, 1, 3, 4]
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits[others], labels[others],
                                                          grad_logprobs[others],
                                                          grad_entropy[others])
    close(logprobs[others], exp_lp, **FORWARD_TOL)
    close(entropy[others], exp_ent, **FORWARD_TOL)
    close_grad(grad[others], exp_grad, dtype, grad_logprobs[others], grad_entropy[others])
    assert torch.isnan(grad[2]).any()


@pytest.mark.parametrize("backend,shape", backend_cases("logprobs", [(s,) for s in SHAPES[:3]],
                                                        [(s,) for s in TRITON_SHAPES]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_entropy_grads_match_float64(backend, shape, dtype):
    """Log-probs only: no entropy output, the gradient of the log-prob term alone."""
    logits, labels = random_case(shape, dtype)
    leaf = logits.clone().requires_grad_(True)
    logprobs = pyalign.token_logprobs(leaf, labels, temperature=0.7, backend=backend)
    upstream = torch.randn(shape[:-1])
    logprobs.backward(upstream)
    exp_lp, _, exp_grad = token_logprobs_and_grad64(logits, labels, upstream, temperature=0.7)
    close(logprobs, exp_lp, **FORWARD_TOL)
    close_grad(leaf.grad, exp_grad, dtype, upstream, temperature=0.7)
    assert torch.all(leaf.grad[labels == IGNORE] == 0), "ignored rows get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_into_the_logits_buffer(backend, dtype):
    """With inplace_backward=True the gradient lands in the logits tensor itself."""
    logits, labels = random_case((6, 300), dtype)
    grad_logprobs, grad_entropy = torch.randn(6), torch.randn(6)
    leaf = logits.clone().requires_grad_(True)
    source = leaf * 1  # a non-leaf buffer the backward may overwrite
    logprobs, entropy = pyalign.token_logprobs(source, labels, temperature=1.3, entropy=True,
                                               backend=backend, inplace_backward=True)
    torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
    _, _, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs, grad_entropy,
                                               temperature=1.3)
    close_grad(leaf.grad, exp_grad, dtype, grad_logprobs, grad_entropy, 1.3)
    assert torch.equal(source.detach(), leaf.grad), "the gradient was not written into the logits"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_into_a_row_strided_view_writes_only_the_view(backend):
    leaf = (torch.randn(12, 1200) * 2).requires_grad_(True)
    wide = leaf * 1
    labels = torch.randint(0, 1000, (12,))
    labels[3] = IGNORE
    upstream = torch.randn(12)
    before = wide.detach().clone()
    view = wide[:, 100:1100]
    pyalign.token_logprobs(view, labels, backend=backend, inplace_backward=True).backward(upstream)
    _, _, exp_grad = token_logprobs_and_grad64(before[:, 100:1100], labels, upstream)
    close_grad(leaf.grad[:, 100:1100], exp_grad, torch.float32, upstream)
    assert torch.equal(view.detach(), leaf.grad[:, 100:1100])
    assert torch.equal(wide.detach()[:, :100], before[:, :100])
    assert torch.equal(wide.detach()[:, 1100:], before[:, 1100:])
    assert torch.all(leaf.grad[:, :100] == 0) and torch.all(leaf.grad[:, 1100:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stride_zero_and_strided_upstream_grads(backend, dtype):
    """.sum() sends an expanded (stride-0) upstream gradient; a strided one comes from a view."""
    logits, labels = random_case((2, 3, 700), dtype, scale=2.0)
    leaf = logits.clone().requires_grad_(True)
    pyalign.token_logprobs(leaf, labels, temperature=0.9, backend=backend).sum().backward()
    _, _, exp_grad = token_logprobs_and_grad64(logits, labels, torch.ones(2, 3), temperature=0.9)
    close_grad(leaf.grad, exp_grad, dtype, torch.ones(2, 3), temperature=0.9)
    leaf.grad = None
    upstream = torch.randn(2, 3, 2)[..., 0]
    assert not upstream.is_contiguous()
    pyalign.token_logprobs(leaf, labels, backend=backend).backward(upstream)
    _, _, exp_grad = token_logprobs_and_grad64(logits, labels, upstream)
    close_grad(leaf.grad, exp_grad, dtype, upstream)


@pytest.mark.parametrize("backend", THREADED)
def test_thread_count_does_not_change_results(backend):
    logits, labels = random_case((64, 3001), torch.float32)
    grad_logprobs, grad_entropy = torch.randn(64), torch.randn(64)

    def run_once():
        leaf = logits.clone().requires_grad_(True)
        logprobs, entropy = pyalign.token_logprobs(leaf, labels, entropy=True, temperature=0.9,
                                                   backend=backend)
        torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
        return logprobs.detach(), entropy.detach(), leaf.grad

    same_under_thread_counts(run_once)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_after_a_leading_minus_inf_block(backend):
    """NaN in a later block of a row whose first block is all -inf still makes the row NaN; a NaN
    row's gradient is NaN there and nowhere else."""
    logits = torch.randn(4, 5000)
    logits[1, 4321] = math.nan
    logits[2, :] = -math.inf
    logits[2, 4500] = math.nan
    logits[2, 10] = 0.0
    labels = torch.tensor([3, 3, 10, 3], device=DEVICE)
    leaf = logits.clone().requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(leaf, labels, entropy=True, backend=backend)
    assert torch.isnan(logprobs[1]) and torch.isnan(logprobs[2]) and torch.isnan(entropy[1])
    assert torch.isfinite(logprobs[[0, 3]]).all() and torch.isfinite(entropy[[0, 3]]).all()
    logprobs.sum().backward()
    assert torch.isnan(leaf.grad[1]).all() and torch.isfinite(leaf.grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_with_a_custom_ignore_index(backend):
    logits = torch.randn(5, 300).requires_grad_(True)
    labels = torch.full((5,), 7, device=DEVICE)
    logprobs, entropy = pyalign.token_logprobs(logits, labels, entropy=True, ignore_index=7,
                                               backend=backend)
    assert torch.all(logprobs == 0) and torch.all(entropy == 0)
    torch.autograd.backward([logprobs, entropy], [torch.randn(5), torch.randn(5)])
    assert torch.all(logits.grad == 0)


def test_every_backend_of_the_device_runs():
    """The backend list covers what the device offers: eager always; on CPU the C++ backend
    (when a compiler exists) and triton in the interpreter; on a GPU triton."""
    assert "eager" in BACKENDS
    if DEVICE.type == "cpu":
        assert "triton" in BACKENDS, "TRITON_INTERPRET=1 must make triton available on CPU"
    else:
        assert "triton" in BACKENDS and "cpu" not in BACKENDS
    assert BACKENDS == backends_for("logprobs")


# ---------------------------------------------------------------- numerical robustness

def poison_ignored_rows(logits, labels):
    """Rows 1, 3, 5, 7, 9 ignored, holding what padded or corrupted positions hold: NaN, +inf,
    -inf, a whole row of -inf and a whole row of NaN."""
    labels[1::2] = IGNORE
    logits[1, 3] = math.nan
    logits[3, 0] = math.inf
    logits[5, -1] = -math.inf
    logits[7] = -math.inf
    logits[9] = math.nan
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_ignored_rows_holding_nan_and_inf_are_inert(backend, dtype, temperature, inplace):
    """An ignored position gives exactly 0 and exactly zero gradient whatever its logits hold;
    the other rows match float64 computed without the ignored ones."""
    logits, labels = random_case((10, 77), dtype)
    logits, labels = poison_ignored_rows(logits, labels)
    grad_logprobs, grad_entropy = torch.randn(10), torch.randn(10)
    leaf = logits.clone().requires_grad_(True)
    source = leaf * 1 if inplace else leaf  # inplace backward writes into a non-leaf buffer
    logprobs, entropy = pyalign.token_logprobs(source, labels, entropy=True, temperature=temperature,
                                               backend=backend, inplace_backward=inplace)
    torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
    ignored = labels == IGNORE
    assert torch.all(logprobs[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(leaf.grad[ignored] == 0), "an ignored row leaks into the gradient"
    valid = ~ignored
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(
        logits[valid], labels[valid], grad_logprobs[valid], grad_entropy[valid],
        temperature=temperature)
    close(logprobs[valid], exp_lp, **FORWARD_TOL)
    close(entropy[valid], exp_ent, **FORWARD_TOL)
    close_grad(leaf.grad[valid], exp_grad, dtype, grad_logprobs[valid], grad_entropy[valid],
               temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_valid_row_next_to_poisoned_ignored_rows_stays_nan(backend):
    logits, labels = random_case((10, 77), torch.float32)
    logits, labels = poison_ignored_rows(logits, labels)
    labels[4] = 11
    logits[4, 50] = math.nan
    leaf = logits.clone().requires_grad_(True)
    logprobs, entropy = pyalign.token_logprobs(leaf, labels, entropy=True, backend=backend)
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isnan(logprobs[4]) and torch.isnan(entropy[4]) and torch.isnan(leaf.grad[4]).any()
    others = torch.ones(10, dtype=torch.bool)
    others[4] = False
    assert torch.isfinite(logprobs[others]).all() and torch.isfinite(entropy[others]).all()
    assert torch.isfinite(leaf.grad[others]).all()


# fp32 offsets: a log-prob at a common logit offset of 1e4 keeps fp32 accuracy (as
# torch.log_softmax does) only when it is computed from the shifted logits z - max z.
OFFSET_RTOL = 1e-6


def assert_relative(actual, expected, rtol, what, floor=1e-30):
    """|actual - expected| <= rtol * max(|expected|, floor), element by element, in float64."""
    error = (actual.double() - expected.double()).abs()
    bound = rtol * expected.double().abs().clamp(min=floor)
    assert torch.all(error <= bound), (f"{what}: relative error "
                                       f"{float((error / bound).max() * rtol):.3g} > {rtol}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e3, 1e4, -1e4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset_keeps_fp32_accuracy(backend, offset, temperature):
    logits, labels = random_case((6, 300), torch.float32)
    logits = logits + offset
    grad_logprobs, grad_entropy = torch.randn(6), torch.randn(6)
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy,
                                  temperature=temperature, backend=backend)
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy, temperature=temperature)
    valid = labels != IGNORE
    assert_relative(logprobs[valid], exp_lp[valid], OFFSET_RTOL, "logprobs")
    assert_relative(entropy[valid], exp_ent[valid], OFFSET_RTOL, "entropy")
    # the gradient, relative to the row's largest entry (entries far below it are p ~ e^-10)
    row_scale = exp_grad.abs().amax(-1, keepdim=True).expand_as(exp_grad)
    error = (grad.double() - exp_grad).abs()
    assert torch.all(error <= 4 * OFFSET_RTOL * row_scale), f"gradient error {float(error.max()):.3g}"
    assert torch.all(grad[~valid] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1e-2, 1e-3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_temperatures_with_large_logits_never_give_positive_logprobs(backend, temperature,
                                                                          dtype):
    """Log-probs lie in [-inf, 0] and entropies in [0, log V] whatever |z/T| is; |z| up to 1e4
    at T = 1e-3 (|z/T| = 1e7) still matches float64."""
    rows, vocab = 64, 50
    logits = (torch.randn(rows, vocab) * 3e3).clamp(-1e4, 1e4).to(dtype)
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    labels = torch.randint(0, vocab, (rows,))
    labels[::4] = logits[::4].float().argmax(-1)  # the label at the max: logprob ~ 0
    labels[5] = IGNORE
    grad_logprobs, grad_entropy = torch.randn(rows), torch.randn(rows)
    logprobs, entropy, grad = run(logits, labels, grad_logprobs, grad_entropy,
                                  temperature=temperature, backend=backend)
    assert torch.all(logprobs <= 0), f"positive log-prob {float(logprobs.max()):.3g}"
    assert not torch.isnan(logprobs).any() and not torch.isinf(logprobs).any()
    assert torch.all(entropy >= 0) and torch.all(entropy <= math.log(vocab) + 1e-6)
    assert torch.isfinite(grad).all()
    exp_lp, exp_ent, exp_grad = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                                          grad_entropy, temperature=temperature)
    close(logprobs, exp_lp, rtol=2e-6, atol=1e-6)
    close(entropy, exp_ent, rtol=1e-5, atol=1e-5)
    close_grad(grad, exp_grad, dtype, grad_logprobs, grad_entropy, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_over_temperature_overflowing_fp32_stay_finite(backend, dtype):
    """|z/T| > fp32 max: the true log-probs are finite (-log 2 for the two tied maxima) or
    -inf (rounding of -6e39), never NaN or +inf."""
    logits = torch.tensor([[3e37, 3e37, -3e37, 0.0], [3e37, -3e37, 1e37, 0.0]]).to(dtype)
    labels = torch.tensor([0, 0])
    logprobs, entropy, grad = run(logits, labels, torch.ones(2), torch.ones(2), temperature=0.01,
                                  backend=backend)
    assert logprobs[0] == pytest.approx(-math.log(2), rel=1e-6) and logprobs[1] == 0
    assert entropy[0] == pytest.approx(math.log(2), rel=1e-6) and entropy[1] == 0
    assert torch.isfinite(grad).all()
    other = pyalign.token_logprobs(logits, torch.tensor([2, 3]), temperature=0.01, backend=backend)
    assert torch.all(other == -math.inf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3])
def test_vocab_of_one_is_exactly_zero(backend, dtype, temperature):
    logits = (torch.randn(7, 1) * 1e3).to(dtype)
    labels = torch.zeros(7, dtype=torch.long)
    labels[2] = IGNORE
    logprobs, entropy, grad = run(logits, labels, torch.randn(7), torch.randn(7),
                                  temperature=temperature, backend=backend)
    assert torch.all(logprobs == 0), logprobs
    assert torch.all(entropy == 0), entropy
    assert torch.all(grad == 0), grad


# --------------------------------------------------------- inplace_backward only where it is safe
# (the logits as built from a float64 leaf [6, 45], vocabulary 40; whether in-place can be right)
ROWS, VOCAB = 6, 40
INPLACE_CASES = {
    "expanded_rows": (lambda leaf: (leaf * 1)[:1, :VOCAB].expand(ROWS, VOCAB), False),
    "stride_0_rows_of_a_1d_buffer": (lambda leaf: (leaf * 1)[0, :VOCAB].expand(ROWS, VOCAB), False),
    "overlapping_rows": (lambda leaf: torch.as_strided(leaf * 1, (ROWS, VOCAB), (3, 1)), False),
    "a_leaf": (lambda leaf: leaf, False),
    "a_view_of_a_leaf": (lambda leaf: leaf[:, :VOCAB], False),
    "a_3d_view_of_a_leaf": (lambda leaf: leaf[:, :VOCAB].reshape(2, 3, VOCAB), False),
    # written in place: a fresh non-leaf, a view of a non-leaf buffer, a private copy
    "contiguous_non_leaf": (lambda leaf: leaf[:, :VOCAB] * 1, True),
    "view_of_a_wider_non_leaf": (lambda leaf: (leaf * 1)[:, :VOCAB], True),
    "expanded_vocab_copied": (lambda leaf: (leaf * 1)[:, :1].expand(ROWS, VOCAB), True),
    "transposed_copied": (lambda leaf: (leaf * 1)[:, :VOCAB].t().contiguous().t(), True),
}


@pytest.fixture
def fresh_inplace_warnings(monkeypatch):
    from pyalign.ops import logprobs as logprobs_module
    monkeypatch.setattr(logprobs_module, "_inplace_warned", set(), raising=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INPLACE_CASES))
def test_inplace_backward_is_right_or_runs_out_of_place(backend, case, fresh_inplace_warnings):
    """Shared storage (stride-0 or overlapping rows) or a caller's leaf: the gradient equals the
    float64 oracle's, the caller's tensor is not overwritten, and one RuntimeWarning says the
    backward ran out of place. A buffer the op may own is still written in place."""
    import warnings
    make, in_place = INPLACE_CASES[case]
    base = torch.randn(ROWS, VOCAB + 5, dtype=torch.float64) * 2
    labels_shape = make(base).shape[:-1]
    labels = torch.randint(0, VOCAB, labels_shape)
    labels.view(-1)[1] = IGNORE
    upstream = torch.randn(labels_shape)
    leaf64 = base.clone().requires_grad_(True)
    (token_logprobs64(make(leaf64), labels, temperature=0.9) * upstream).sum().backward()
    leaf = base.float().requires_grad_(True)
    before = leaf.detach().clone()
    logits = make(leaf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pyalign.token_logprobs(logits, labels, temperature=0.9, backend=backend,
                                     inplace_backward=True)
        (out * upstream).sum().backward()
    ours = [w for w in caught if "inplace_backward=True ignored" in str(w.message)]
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-6)
    if in_place:
        assert not ours, [str(w.message) for w in ours]
    else:
        assert len(ours) == 1 and ours[0].category is RuntimeWarning
        assert torch.equal(leaf.detach(), before), "the caller's tensor was overwritten"
        assert leaf.grad.data_ptr() != leaf.data_ptr()
        # once per process (per reason): the second call is silent and still right
        leaf.grad = None
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            (pyalign.token_logprobs(make(leaf), labels, temperature=0.9, backend=backend,
                                    inplace_backward=True) * upstream).sum().backward()
        assert not [w for w in again if "inplace_backward" in str(w.message)]
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_still_lands_in_an_owned_buffer(backend, fresh_inplace_warnings):
    """A contiguous non-leaf that owns its whole storage keeps the in-place path."""
    leaf = torch.randn(ROWS, VOCAB).requires_grad_(True)
    logits = leaf * 1
    labels = torch.randint(0, VOCAB, (ROWS,))
    upstream = torch.randn(ROWS)
    pyalign.token_logprobs(logits, labels, backend=backend, inplace_backward=True).backward(upstream)
    assert torch.equal(logits.detach(), leaf.grad), "the gradient was not written into the logits"
    exp = token_logprobs_and_grad64(leaf.detach(), labels, upstream)[2]
    torch.testing.assert_close(leaf.grad.double(), exp, rtol=1e-5, atol=1e-6)
