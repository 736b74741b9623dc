"""csrc/cpu/logprobs.cpp: per-token log-probs / entropy forward and backward on the CPU backend,
against the float64 oracle (tests/oracle.py), called directly (torch.ops.pyalign_C) and through
the public pyalign.token_logprobs(backend="cpu")."""
import math

import pytest
import torch

import pyalign
from oracle import IGNORE, token_logprobs_and_grad64
from testutil import poison_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of forward values and of gradients, per input dtype. Forward math is fp32 for
# every dtype; bf16/fp16 gradients are rounded once into the input dtype.
TOL = {
    torch.float32: dict(fwd=(1e-5, 1e-5), bwd=(1e-4, 1e-6)),
    torch.bfloat16: dict(fwd=(1e-5, 2e-5), bwd=(1e-2, 1e-5)),
    torch.float16: dict(fwd=(1e-5, 2e-5), bwd=(2e-3, 1e-6)),
}



def make_case(rows, vocab, dtype, *, scale=3.0, masked=True, ignored=True):
    logits = (torch.randn(rows, vocab) * scale).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[0] = 0
    labels[-1] = vocab - 1
    if ignored and rows > 2:
        labels[1] = IGNORE
    if masked and vocab > 4:
        # masked vocabulary: -inf logits in a few rows, never on the label
        for row in range(0, rows, 3):
            cols = torch.randperm(vocab)[: vocab // 3]
            cols = cols[cols != labels[row]]
            logits[row, cols] = -math.inf
    return logits, labels


def check_close(actual, expected, tol, what):
    rtol, atol = tol
    actual64 = actual.double()
    assert not torch.isnan(actual64).any(), f"{what}: NaN in output"
    torch.testing.assert_close(actual64, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(9, 1), (33, 1000), (6, 5003), (3, 128256)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_forward_backward_vs_oracle(cpu_ops, dtype, rows, vocab, temperature, with_entropy):
    logits, labels = make_case(rows, vocab, dtype)
    grad_logprobs = torch.randn(rows)  # upstream grad != 1
    grad_entropy = torch.randn(rows) if with_entropy else None
    logprobs64, entropy64, grad64 = token_logprobs_and_grad64(
        logits, labels, grad_logprobs, grad_entropy, IGNORE, temperature)

    logprobs, entropy, lse = (poison_(torch.empty(n)) for n in (rows, rows if with_entropy else 0, rows))
    cpu_ops.logprobs_forward_out(logits, labels, IGNORE, temperature, with_entropy, logprobs, entropy, lse)
    allocated = cpu_ops.logprobs_forward(logits, labels, IGNORE, temperature, with_entropy)
    for out, alloc in zip((logprobs, entropy, lse), allocated):
        assert alloc.dtype == torch.float32 and torch.equal(out, alloc)
    tol = TOL[dtype]
    check_close(logprobs, logprobs64, tol["fwd"], "logprobs")
    lse64 = torch.logsumexp(logits.double() / temperature, -1)
    check_close(lse, lse64, tol["fwd"], "lse")
    if with_entropy:
        check_close(entropy, entropy64, tol["fwd"], "entropy")
    assert torch.all(logprobs[labels == IGNORE] == 0)

    grad = poison_(torch.empty_like(logits))
    cpu_ops.logprobs_backward_out(grad_logprobs, grad_entropy, logits, labels, lse,
                                  entropy if with_entropy else None, IGNORE, temperature, grad)
    allocated = cpu_ops.logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse,
                                          entropy if with_entropy else None, IGNORE, temperature)
    assert allocated.dtype == dtype and torch.equal(allocated, grad)
    check_close(grad, grad64, tol["bwd"], "grad_logits")
    assert torch.all(grad[labels == IGNORE] == 0)
    assert torch.all(grad[torch.isneginf(logits)] == 0)

    in_place = logits.clone()
    cpu_ops.logprobs_backward_(grad_logprobs, grad_entropy, in_place, labels, lse,
                               entropy if with_entropy else None, IGNORE, temperature)
    assert torch.equal(in_place, grad), "in-place backward differs from the out-of-place one"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_cpu_backend(cpu_ops, dtype):
    """pyalign.token_logprobs(backend='cpu') on [B, T, V] with entropy, both backward modes."""
    logits, labels = make_case(4 * 5, 777, dtype)
    logits, labels = logits.view(4, 5, 777), labels.view(4, 5)
    grad_logprobs, grad_entropy = torch.randn(4, 5), torch.randn(4, 5)
    logprobs64, entropy64, grad64 = token_logprobs_and_grad64(
        logits, labels, grad_logprobs, grad_entropy, IGNORE, 1.3)
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        source = leaf * 1 if inplace else leaf  # in-place backward overwrites its input buffer
        logprobs, entropy = pyalign.token_logprobs(source, labels, temperature=1.3, entropy=True,
                                                   backend="cpu", inplace_backward=inplace)
        check_close(logprobs, logprobs64, TOL[dtype]["fwd"], "logprobs")
        check_close(entropy, entropy64, TOL[dtype]["fwd"], "entropy")
        (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
        check_close(leaf.grad, grad64, TOL[dtype]["bwd"], f"grad (inplace={inplace})")


def test_non_contiguous_inputs(cpu_ops):
    """Row-strided views run in place of a copy; column-strided ones are made contiguous."""
    wide = torch.randn(12, 1200)
    labels = torch.randint(0, 1000, (12,))
    grad_logprobs = torch.randn(12)
    views = {"row_strided": wide[:, 100:1100], "transposed": torch.randn(1000, 12).t()}
    for name, logits in views.items():
        assert not logits.is_contiguous()
        logprobs64, _, grad64 = token_logprobs_and_grad64(logits, labels, grad_logprobs)
        logprobs, _, lse = cpu_ops.logprobs_forward(logits, labels, IGNORE, 1.0, False)
        check_close(logprobs, logprobs64, TOL[torch.float32]["fwd"], name)
        grad = cpu_ops.logprobs_backward(grad_logprobs, None, logits, labels, lse, None, IGNORE, 1.0)
        check_close(grad, grad64, TOL[torch.float32]["bwd"], name)
    # in place into a row-strided view writes only the view's elements
    before = wide.clone()
    view = wide[:, 100:1100]
    _, _, lse = cpu_ops.logprobs_forward(view, labels, IGNORE, 1.0, False)
    expected = cpu_ops.logprobs_backward(grad_logprobs, None, view, labels, lse, None, IGNORE, 1.0)
    cpu_ops.logprobs_backward_(grad_logprobs, None, view, labels, lse, None, IGNORE, 1.0)
    assert torch.equal(view, expected)
    assert torch.equal(wide[:, :100], before[:, :100]) and torch.equal(wide[:, 1100:], before[:, 1100:])


def test_all_ignored_and_custom_ignore_index(cpu_ops):
    logits = torch.randn(5, 300)
    labels = torch.full((5,), 7)
    logprobs, entropy, _ = cpu_ops.logprobs_forward(logits, labels, 7, 1.0, True)
    assert torch.all(logprobs == 0) and torch.all(entropy == 0)
    grad = cpu_ops.logprobs_backward(torch.randn(5), torch.randn(5), logits, labels,
                                     torch.zeros(5), entropy, 7, 1.0)
    assert torch.all(grad == 0)


def test_thread_count_does_not_change_results(cpu_ops, threads):
    logits, labels = make_case(64, 3001, torch.float32)
    grad_logprobs, grad_entropy = torch.randn(64), torch.randn(64)

    def run():
        logprobs, entropy, lse = cpu_ops.logprobs_forward(logits, labels, IGNORE, 0.9, True)
        grad = cpu_ops.logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                         IGNORE, 0.9)
        return logprobs, entropy, lse, grad

    one, two = threads(1, run), threads(2, run)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_nan_propagates_to_its_row_only(cpu_ops):
    logits = torch.randn(4, 5000)
    logits[1, 4321] = math.nan
    logits[2, :] = -math.inf          # a leading block of -inf, then a NaN in a later block
    logits[2, 4500] = math.nan
    logits[2, 10] = 0.0
    labels = torch.tensor([3, 3, 10, 3])
    logprobs, entropy, lse = cpu_ops.logprobs_forward(logits, labels, IGNORE, 1.0, True)
    assert torch.isnan(logprobs[1]) and torch.isnan(logprobs[2]) and torch.isnan(entropy[1])
    assert torch.isfinite(logprobs[[0, 3]]).all() and torch.isfinite(entropy[[0, 3]]).all()
    grad = cpu_ops.logprobs_backward(torch.ones(4), None, logits, labels, lse, None, IGNORE, 1.0)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_bad_input_raises_clear_errors(cpu_ops):
    logits = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="outside \\[0, 10\\)"):
        cpu_ops.logprobs_forward(logits, torch.tensor([0, 10, 1]), IGNORE, 1.0, False)
    with pytest.raises(RuntimeError, match="outside"):
        cpu_ops.logprobs_forward(logits, torch.tensor([0, -5, 1]), IGNORE, 1.0, False)
    with pytest.raises(RuntimeError, match="int64"):
        cpu_ops.logprobs_forward(logits, torch.tensor([0, 1, 2], dtype=torch.int32), IGNORE, 1.0, False)
    with pytest.raises(RuntimeError, match="2-D"):
        cpu_ops.logprobs_forward(logits[None], torch.tensor([0, 1, 2]), IGNORE, 1.0, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_ops.logprobs_forward(logits.double(), torch.tensor([0, 1, 2]), IGNORE, 1.0, False)
    with pytest.raises(RuntimeError, match="temperature"):
        cpu_ops.logprobs_forward(logits, torch.tensor([0, 1, 2]), IGNORE, 0.0, False)
    with pytest.raises(ValueError, match="labels out of range"):
        pyalign.token_logprobs(logits, torch.tensor([0, 11, 1]), backend="cpu")


def test_exp_matches_float64(cpu_ops):
    """The vectorized exp the kernels use: <= 2 ulp on its domain, 0 below it, NaN kept."""
    x = torch.cat([torch.linspace(-87.0, 0.5, 200001), -torch.rand(1000) * 1e-6])
    approx = cpu_ops.exp_nonpositive(x).double()
    exact = x.double().exp()
    assert ((approx - exact).abs() / exact).max() < 2.5e-7
    special = cpu_ops.exp_nonpositive(torch.tensor([-math.inf, -1000.0, -87.5, math.nan, 0.0]))
    assert special[:3].eq(0).all() and torch.isnan(special[3]) and special[4] == 1.0
