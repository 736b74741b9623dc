"""pyalign.linear_token_logprobs (hidden @ weight.T + bias -> log-probs of the labels) on every
backend of the test device (support.backends_for) against float64: values, entropy, gradients of
hidden, weight and bias in fp32/bf16/fp16, chunk sizes that do not divide the token count,
non-contiguous inputs, the Triton tiles (several along tokens, vocabulary and hidden, partial
last ones); and a peak-memory measurement showing that no path holds the whole [N, V] logits.
Then TRL's head options and outputs (softcap, logit_scale, log_sum_sq_probs, mean_logits,
is_top1) against float64 and against TRL's own ChunkedLogProbFunction, the memory_budget path
against the recompute path, its memory, and the errors for bad options.
"""

import pytest
import torch

import pyalign
from support import (
    IGNORE,
    ON_CPU,
    backend_cases,
    backends_for,
    entropy64,
    grads64,
    head_logits64,
    head_outputs64,
    linear_logits64,
    peak_allocated_bytes,
    token_logprobs64,
    token_logprobs_and_grad64,
)

BACKENDS = backends_for("linear_logprobs")
# (leading shape, H, V): V = 1; V = 7 with [B, T] tokens; V = 1000; a Llama-2 vocabulary with few
# tokens.
SHAPES = [((5,), 3, 1), ((2, 7), 16, 7), ((37,), 32, 1000), ((6,), 8, 32000)]
# The Triton interpreter is slow: 37 tokens, H = 48, V = 300 still take several fp32 tiles
# (32 tokens, 64 vocabulary, 32 hidden) in each direction with a partial last one.
# V = 1 has its own test (there the exact d_hidden is 0 and only an absolute bound makes sense).
TRITON_SHAPES = [((2, 7), 16, 7), ((37,), 48, 300)]


def random_case(lead, hidden_size, vocab, dtype, with_bias):
    hidden = torch.randn(*lead, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * (2.0 / hidden_size ** 0.5)).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, lead)
    flat = labels.view(-1)
    flat[0] = vocab - 1
    if flat.numel() > 3:
        flat[1] = IGNORE
        flat[-1] = 0
        flat[2] = IGNORE
    return hidden, weight, bias, labels


def oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy, temperature):
    """float64 (logprobs, entropy) and the gradients of sum(lp*g_lp + ent*g_ent) w.r.t. hidden,
    weight and bias, by autograd."""
    inputs = [hidden, weight] + ([bias] if bias is not None else [])

    def objective_terms(h, w, b=None):
        logits = linear_logits64(h, w, b)
        logprobs = token_logprobs64(logits, labels, IGNORE, temperature)
        entropy = entropy64(logits, labels, IGNORE, temperature)
        return torch.stack([logprobs, entropy])

    values, grads = grads64(objective_terms, inputs, torch.stack([grad_logprobs, grad_entropy]))
    return values[0], values[1], grads


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (the honest measure for bf16 matmuls)."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


def run(hidden, weight, bias, labels, grad_logprobs, grad_entropy, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = bias.clone().requires_grad_(True) if bias is not None else None
    logprobs, entropy = pyalign.linear_token_logprobs(*leaves, labels, bias=bias_leaf, entropy=True,
                                                      **kwargs)
    torch.autograd.backward([logprobs, entropy], [grad_logprobs, grad_entropy])
    grads = [leaf.grad for leaf in leaves] + ([bias_leaf.grad] if bias is not None else [])
    return logprobs.detach(), entropy.detach(), grads


@pytest.mark.parametrize("backend,lead,hidden_size,vocab",
                         backend_cases("linear_logprobs", SHAPES, TRITON_SHAPES))
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)],
                         ids=["nobias-T1", "bias-T0.7"])
def test_fp32_matches_float64(backend, lead, hidden_size, vocab, chunk_size, with_bias,
                              temperature):
    hidden, weight, bias, labels = random_case(lead, hidden_size, vocab, torch.float32, with_bias)
    grad_logprobs, grad_entropy = torch.randn(lead), torch.randn(lead)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   chunk_size=chunk_size, temperature=temperature, backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs,
                                        grad_entropy, temperature)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == labels.shape
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), exp_ent, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=False):
        assert grad.dtype == torch.float32, name
        # fp32 reductions over V (hidden: 32000 terms that cancel) or N (weight, bias)
        assert relative_error(grad, expected) < 5e-5, name
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
    ignored = labels == IGNORE
    assert torch.all(logprobs[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(grads[0][ignored] == 0)


@pytest.mark.parametrize("backend,lead,hidden_size,vocab",
                         backend_cases("linear_logprobs", SHAPES[1:], TRITON_SHAPES))
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_matches_float64(backend, lead, hidden_size, vocab, chunk_size, dtype):
    hidden, weight, bias, labels = random_case(lead, hidden_size, vocab, dtype, True)
    grad_logprobs, grad_entropy = torch.randn(lead), torch.randn(lead)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   chunk_size=chunk_size, backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs,
                                        grad_entropy, 1.0)
    assert logprobs.dtype == torch.float32
    # the logits of a bf16 matmul are rounded to bf16 (2^-9 relative, logits up to ~8 here)
    # before the fp32 epilogue, and the gradients are stored in bf16
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(entropy.double(), exp_ent, rtol=1e-2, atol=2e-2)
    for name, grad, expected in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=False):
        assert grad.dtype == dtype, name
        assert relative_error(grad, expected) < 2e-2, name
    assert torch.all(grads[0][labels == IGNORE] == 0), "ignored rows get exactly zero d_hidden"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weight_grad_accumulates_in_fp32(backend):
    """One token per chunk; the first token's hidden state is 400x the others', so after it the
    running grad_weight sum is ~300 (bf16 ulp 2) and each later token adds < 1: a bf16
    accumulator drops every one of them (5% error here), fp32 keeps them (0.2%)."""
    tokens, hidden_size, vocab = 128, 8, 16
    hidden, weight, bias, labels = random_case((tokens,), hidden_size, vocab, torch.bfloat16, True)
    hidden = hidden.abs()  # same-signed contributions: the sum grows, the increments do not
    hidden[0] *= 400
    labels[:] = 3
    grad_logprobs, grad_entropy = torch.ones(tokens), torch.zeros(tokens)
    _, _, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy, chunk_size=1,
                      backend=backend)
    _, _, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy, 1.0)
    assert relative_error(grads[1], exp_grads[1]) < 1e-2


def test_gradcheck_float64():
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 3])

    def linear_logprobs(h, w, b):
        return pyalign.linear_token_logprobs(h, w, labels, bias=b, entropy=True, temperature=0.8,
                                             chunk_size=2)

    assert torch.autograd.gradcheck(linear_logprobs, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend):
    hidden, weight, bias, labels = random_case((45,), 16, 300, torch.float32, True)
    grad_logprobs, grad_entropy = torch.randn(45), torch.randn(45)
    results = [run(hidden, weight, bias, labels, grad_logprobs, grad_entropy, chunk_size=size,
                   backend=backend) for size in (None, 1, 7, 45, 1000)]
    first_lp, first_ent, first_grads = results[0]
    # The chunk size changes only the order of the fp32 sums in the gradient matmuls, so two
    # results may differ by the classical bound for a sum of K terms: K * u * sum(|term|), per
    # element (u = 2**-24, doubled because both results carry it). The |term| sums come from
    # the float64 gradient of the logits.
    _, _, grad_logits = token_logprobs_and_grad64(linear_logits64(hidden, weight, bias), labels,
                                                  grad_logprobs, grad_entropy)
    abs_grad_logits = grad_logits.abs()
    term_sums = (abs_grad_logits @ weight.double().abs(),            # hidden: sum over V
                 abs_grad_logits.t() @ hidden.double().abs(),        # weight: sum over N
                 abs_grad_logits.sum(0))                             # bias: sum over N
    terms = (weight.shape[0], hidden.shape[0], hidden.shape[0])
    for logprobs, entropy, grads in results[1:]:
        torch.testing.assert_close(logprobs, first_lp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(entropy, first_ent, rtol=1e-6, atol=1e-6)
        for grad, first, term_sum, count in zip(grads, first_grads, term_sums, terms, strict=True):
            bound = 2 * count * 2.0 ** -24 * term_sum + 1e-7
            assert torch.all((grad.double() - first.double()).abs() <= bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [0, 6])
def test_all_ignored_and_empty_give_zeros_and_zero_grads(backend, tokens):
    hidden, weight, bias, _ = random_case((2, 5), 8, 33, torch.float32, True)
    hidden = hidden[:, :tokens // 2] if tokens else hidden[:0]
    labels = torch.full(hidden.shape[:-1], IGNORE)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, torch.randn(labels.shape),
                                   torch.randn(labels.shape), chunk_size=4, backend=backend)
    assert logprobs.shape == labels.shape and torch.all(logprobs == 0) and torch.all(entropy == 0)
    for grad, tensor in zip(grads, (hidden, weight, bias), strict=False):
        assert grad.shape == tensor.shape and torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden(backend):
    base = torch.randn(20, 12)
    hidden = base[::2, 2:10]  # strided rows, a slice of the hidden size
    weight = torch.randn(40, 8) / 2
    labels = torch.randint(0, 40, (10,))
    grad_logprobs, grad_entropy = torch.randn(10), torch.randn(10)
    logprobs, entropy, grads = run(hidden, weight, None, labels, grad_logprobs, grad_entropy,
                                   chunk_size=3, backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, None, labels, grad_logprobs, grad_entropy,
                                        1.0)
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, exp_grads, strict=False):
        assert relative_error(grad, expected) < 1e-5


def test_chunked_path_never_holds_the_full_logits():
    """N=4096 tokens, V=32000: the naive path holds the [N, V] fp32 logits (524 MB) and more; each
    backend's chunked path (256 tokens a chunk: 33 MB of logits) stays under a few chunks, and the
    fused Triton kernel under that (it never holds more than a tile). Not triton in the CPU
    interpreter: 4096 x 32000 there takes minutes; the GPU run measures it."""
    tokens, vocab, hidden_size, chunk_size = 4096, 32000, 16, 256
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,))

    def naive():
        logits = hidden @ weight.t()
        torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum().backward()

    full_logits_bytes = tokens * vocab * 4
    chunk_bytes = chunk_size * vocab * 4
    naive_peak = peak_allocated_bytes(naive)
    assert naive_peak >= full_logits_bytes, "the measurement does not see the naive [N, V] logits"
    for backend in BACKENDS:
        if backend == "triton" and ON_CPU:
            continue

        def chunked(backend=backend):
            pyalign.linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size,
                                          backend=backend).sum().backward()

        hidden.grad = weight.grad = None
        chunked_peak = peak_allocated_bytes(chunked)
        assert chunked_peak < 8 * chunk_bytes, (
            f"{backend}: chunked peak {chunked_peak / 1e6:.0f} MB, "
            f"naive {naive_peak / 1e6:.0f} MB, one chunk of logits {chunk_bytes / 1e6:.0f} MB")


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_strided_hidden_and_row_strided_weight(backend):
    hidden = torch.randn(40, 20).t()  # column stride 20
    weight = (torch.cat([torch.randn(100, 40)] * 2, 1) / 2)[:, 5:45]  # row stride 80
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = torch.randint(0, 100, (20,))
    labels[4] = IGNORE
    grad_logprobs, grad_entropy = torch.randn(20), torch.randn(20)
    logprobs, entropy, grads = run(hidden, weight, None, labels, grad_logprobs, grad_entropy,
                                   backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, None, labels, grad_logprobs, grad_entropy,
                                        1.0)
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), exp_ent, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, exp_grads, strict=False):
        assert relative_error(grad, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_without_entropy_grads_match_float64(backend, with_bias):
    """entropy=False: log-probs only, and the gradient of the log-prob term alone."""
    hidden, weight, bias, labels = random_case((37,), 48, 300, torch.float32, with_bias)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = bias.clone().requires_grad_(True) if with_bias else None
    logprobs = pyalign.linear_token_logprobs(*leaves, labels, bias=bias_leaf, temperature=0.8,
                                             backend=backend)
    assert isinstance(logprobs, torch.Tensor)
    upstream = torch.randn(37)
    logprobs.backward(upstream)
    exp_lp, _, exp_grads = oracle(hidden, weight, bias, labels, upstream, torch.zeros(37), 0.8)
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-5, atol=1e-5)
    got = [leaf.grad for leaf in leaves] + ([bias_leaf.grad] if with_bias else [])
    for grad, expected in zip(got, exp_grads, strict=False):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(expected.abs().max())))
    assert torch.all(leaves[0].grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_of_one(backend):
    """V = 1: log-prob 0 and entropy 0 for every valid token; the exact d_hidden and d_weight are 0,
    fp32 rounding of 1 - p leaves at most ~1e-5 of the upstream scale."""
    hidden, weight, bias, labels = random_case((5,), 16, 1, torch.float32, True)
    labels[:] = 0
    grad_logprobs, grad_entropy = torch.randn(5), torch.randn(5)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs,
                                        grad_entropy, 1.0)
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double(), exp_ent, rtol=1e-5, atol=2e-5)
    for grad, expected in zip(grads, exp_grads, strict=False):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5,
                                   atol=1e-5 * max(1.0, float(expected.abs().max())))


# ---------------------------------------------------------------- numerical robustness

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_size,temperature", [(None, 1.0), (3, 0.7)], ids=["T1", "chunk3-T0.7"])
def test_ignored_tokens_with_nan_and_inf_hidden_are_inert(backend, dtype, chunk_size, temperature):
    """Padded positions whose hidden state holds NaN, +inf, -inf or a whole row of -inf give 0,
    d_hidden exactly 0 there, and contribute nothing to d_weight / d_bias: those equal float64
    computed without the ignored tokens."""
    hidden, weight, bias, labels = random_case((10,), 16, 40, dtype, True)
    labels[1::2] = IGNORE
    hidden[1, 3] = float("nan")
    hidden[3, 0] = float("inf")
    hidden[5, 7] = float("-inf")
    hidden[7] = float("-inf")
    hidden[9] = float("nan")
    grad_logprobs, grad_entropy = torch.randn(10), torch.randn(10)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   chunk_size=chunk_size, temperature=temperature, backend=backend)
    ignored = labels == IGNORE
    assert torch.all(logprobs[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(grads[0][ignored] == 0), "an ignored token gets a nonzero d_hidden"
    assert torch.isfinite(grads[1]).all(), "a padded hidden row leaks into d_weight"
    assert torch.isfinite(grads[2]).all(), "a padded hidden row leaks into d_bias"
    valid = ~ignored
    exp_lp, exp_ent, exp_grads = oracle(hidden[valid], weight, bias, labels[valid],
                                        grad_logprobs[valid], grad_entropy[valid], temperature)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(logprobs[valid].double(), exp_lp, **tol)
    torch.testing.assert_close(entropy[valid].double(), exp_ent, **tol)
    limit = 5e-5 if dtype == torch.float32 else 2e-2
    for name, grad, expected in zip(("hidden", "weight", "bias"),
                                    (grads[0][valid], grads[1], grads[2]), exp_grads, strict=True):
        assert relative_error(grad, expected) < limit, name


def exact_fp32_case(tokens, hidden_size, vocab, offset):
    """Inputs whose logits are exact in fp32 (small integers times multiples of 1/64 plus an
    offset that is a multiple of 1/64 below 2^17): the kernels' error is then that of the
    log-sum-exp alone, not of the matmul's rounding."""
    hidden = torch.randint(-3, 4, (tokens, hidden_size)).float()
    weight = torch.randint(-8, 9, (vocab, hidden_size)).float() / 64
    bias = offset + torch.randint(-64, 65, (vocab,)).float() / 64
    labels = torch.randint(0, vocab, (tokens,))
    labels[1] = IGNORE
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e3, 1e4, -1e4])
def test_large_common_offset_keeps_fp32_accuracy(backend, offset):
    hidden, weight, bias, labels = exact_fp32_case(9, 8, 70, offset)
    grad_logprobs, grad_entropy = torch.randn(9), torch.randn(9)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   temperature=0.7, backend=backend)
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs,
                                        grad_entropy, 0.7)
    valid = labels != IGNORE
    torch.testing.assert_close(logprobs[valid].double(), exp_lp[valid], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy[valid].double(), exp_ent[valid], rtol=1e-6, atol=1e-7)
    for name, grad, expected in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=True):
        assert relative_error(grad, expected) < 2e-6, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1e-2, 1e-3])
def test_small_temperatures_with_large_logits_never_give_positive_logprobs(backend, temperature):
    """|z| up to ~1e4 at T = 1e-3: log-probs in [-inf, 0], never NaN or +inf, entropy >= 0, all
    as float64 says (exact fp32 logits, so the comparison is of the log-sum-exp alone)."""
    hidden, weight, bias, labels = exact_fp32_case(12, 8, 50, 0.0)
    weight = weight * 512  # logits up to ~1e3, |z / T| up to ~1e6
    logits = linear_logits64(hidden, weight, bias)
    labels[::3] = logits[::3].argmax(-1)  # the label at the max: logprob ~ 0
    labels[1] = IGNORE
    grad_logprobs, grad_entropy = torch.randn(12), torch.randn(12)
    logprobs, entropy, grads = run(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                   temperature=temperature, backend=backend)
    assert torch.all(logprobs <= 0) and torch.isfinite(logprobs).all()
    assert torch.all(entropy >= 0) and torch.isfinite(entropy).all()
    exp_lp, exp_ent, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs,
                                        grad_entropy, temperature)
    torch.testing.assert_close(logprobs.double(), exp_lp, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), exp_ent, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3])
def test_vocab_of_one_is_exactly_zero(backend, temperature):
    """V = 1: p = 1 exactly, so log-prob, entropy and every gradient are exactly 0."""
    hidden, weight, bias, labels = random_case((6,), 16, 1, torch.float32, True)
    hidden = hidden * 100
    labels[:] = 0
    labels[2] = IGNORE
    logprobs, entropy, grads = run(hidden, weight, bias, labels, torch.randn(6), torch.randn(6),
                                   temperature=temperature, backend=backend)
    assert torch.all(logprobs == 0) and torch.all(entropy == 0)
    for name, grad in zip(("hidden", "weight", "bias"), grads, strict=True):
        assert torch.all(grad == 0), name


# ---------------------------------------------------------------- TRL's head options and outputs

ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
METRICS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# (softcap, logit_scale, temperature): each option alone, all together, a Gemma-like strong cap
HEADS = [(None, 1.0, 1.0), (2.5, 1.0, 1.0), (None, 0.3, 1.0), (None, 1.0, 0.7),
         (2.5, 0.3, 0.7), (30.0, 2.0, 1.3)]
HEAD_SHAPES = [((37,), 24, 300), ((2, 7), 16, 7)]
TRITON_HEAD_SHAPES = [((2, 7), 16, 7), ((9,), 16, 100)]


def head_oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy, softcap, logit_scale,
                temperature):
    """float64 outputs (dict) and the gradients of sum(lp*g_lp + ent*g_ent) by autograd."""
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    flat_labels = labels.reshape(-1)

    def differentiable(h, w, b=None):
        z = head_logits64(h.reshape(-1, h.shape[-1]), w, b, softcap, logit_scale, temperature)
        out = head_outputs64(z, flat_labels)
        return torch.stack([out["log_probs"], out["entropy"]])

    upstream = torch.stack([grad_logprobs.reshape(-1), grad_entropy.reshape(-1)])
    _, grads = grads64(differentiable, inputs, upstream)
    z = head_logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap, logit_scale,
                      temperature)
    return {k: v.view(labels.shape) for k, v in head_outputs64(z, flat_labels).items()}, grads


def run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy, outputs=ALL_OUTPUTS,
             **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = bias.clone().requires_grad_(True) if bias is not None else None
    out = pyalign.linear_token_logprobs(*leaves, labels, bias=bias_leaf, outputs=outputs, **kwargs)
    differentiable = [out.log_probs] + ([out.entropy] if out.entropy is not None else [])
    upstream = [grad_logprobs] + ([grad_entropy] if out.entropy is not None else [])
    torch.autograd.backward(differentiable, upstream)
    grads = [leaf.grad for leaf in leaves] + ([bias_leaf.grad] if bias is not None else [])
    return out, grads


@pytest.mark.parametrize("backend,lead,hidden_size,vocab",
                         backend_cases("linear_logprobs", HEAD_SHAPES, TRITON_HEAD_SHAPES))
@pytest.mark.parametrize("softcap,logit_scale,temperature", HEADS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "lp+ent"])
def test_head_options_and_outputs_match_float64(backend, lead, hidden_size, vocab, softcap,
                                                logit_scale, temperature, with_bias,
                                                with_entropy):
    """Every output, and the gradients of logprobs (and entropy) with per-token upstream
    gradients, for softcap x logit_scale x temperature x bias x entropy, with ignored rows."""
    hidden, weight, bias, labels = random_case(lead, hidden_size, vocab, torch.float32, with_bias)
    hidden = hidden * 3  # logits of ~10: the softcap of 2.5 saturates, 30 nearly does not
    flat = labels.view(-1)
    # the label at the row's argmax for a few rows, so that is_top1 is True somewhere
    logits = linear_logits64(hidden.reshape(-1, hidden_size), weight, bias)
    flat[3::4] = logits[3::4].argmax(-1)
    grad_logprobs, grad_entropy = torch.randn(lead), torch.randn(lead)
    outputs = ALL_OUTPUTS if with_entropy else METRICS
    out, grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy, outputs,
                          softcap=softcap, logit_scale=logit_scale, temperature=temperature,
                          chunk_size=4, backend=backend)
    expected, exp_grads = head_oracle(hidden, weight, bias, labels, grad_logprobs,
                                      grad_entropy if with_entropy else torch.zeros(lead),
                                      softcap, logit_scale, temperature)
    assert isinstance(out, pyalign.ops.linear_logprobs.LinearLogprobsOutput)
    assert (out.entropy is not None) == with_entropy
    for name in ("log_probs",) + outputs:
        value = getattr(out, name)
        assert value.shape == labels.shape, name
        if name == "is_top1":
            assert value.dtype == torch.bool
            assert torch.equal(value, expected[name]), name
            continue
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=2e-5,
                                   msg=name)
    assert expected["is_top1"].any() and not expected["is_top1"].all()
    for name in METRICS:
        assert not getattr(out, name).requires_grad, f"{name} is a metric: no gradient (as TRL)"
    ignored = labels == IGNORE
    for name in ("log_probs",) + outputs:
        assert torch.all(getattr(out, name)[ignored] == 0), name
    for name, grad, expected_grad in zip(("hidden", "weight", "bias"), grads, exp_grads,
                                         strict=False):
        assert relative_error(grad, expected_grad) < 5e-5, name
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4,
                                   atol=1e-5 * float(expected_grad.abs().max()), msg=name)
    assert torch.all(grads[0][ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_head_options_in_half_precision(backend, dtype):
    hidden, weight, bias, labels = random_case((2, 7), 16, 7 if backend == "triton" else 300,
                                               dtype, True)
    grad_logprobs, grad_entropy = torch.randn(2, 7), torch.randn(2, 7)
    out, grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                          softcap=2.0, logit_scale=0.7, temperature=0.9, backend=backend)
    expected, exp_grads = head_oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                      2.0, 0.7, 0.9)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(out, name).double(), expected[name], rtol=2e-2,
                                   atol=3e-2, msg=name)
    for name, grad, expected_grad in zip(("hidden", "weight", "bias"), grads, exp_grads,
                                         strict=True):
        assert grad.dtype == dtype
        assert relative_error(grad, expected_grad) < 3e-2, name


def test_matches_trl_chunked_logprob_function():
    """TRL 1.16's own ChunkedLogProbFunction (its torch fallback on CPU) on the same inputs:
    every output and the gradients, with softcap, logit_scale, temperature and a bias. TRL has
    no ignore_index (its caller selects the valid rows), so every label is valid here."""
    trl_kernel = pytest.importorskip("trl.kernels.chunked_logprob", reason="trl is not installed")
    ChunkedLogProbFunction = trl_kernel.ChunkedLogProbFunction

    hidden, weight, bias, labels = random_case((33,), 24, 500, torch.float32, True)
    labels = labels.clamp(min=0)
    hidden = hidden * 3
    labels[::5] = linear_logits64(hidden, weight, bias)[::5].argmax(-1)
    grad_logprobs, grad_entropy = torch.randn(33), torch.randn(33)
    options = dict(softcap=4.0, logit_scale=0.6, temperature=0.8)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    trl_out = ChunkedLogProbFunction.apply(leaves[0], leaves[1], leaves[2], labels, 0.8, 128, 4.0,
                                           0.6, ALL_OUTPUTS)
    torch.autograd.backward(trl_out[:2], [grad_logprobs, grad_entropy])
    trl_grads = [leaf.grad for leaf in leaves]
    for backend in BACKENDS:
        if backend == "triton":
            continue  # the interpreter at V = 500 is slow; the float64 tests cover it
        out, grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                              backend=backend, **options)
        for name, theirs in zip(("log_probs",) + ALL_OUTPUTS, trl_out, strict=True):
            ours = getattr(out, name)
            if name == "is_top1":
                assert torch.equal(ours, theirs), backend
                assert ours.any(), "no top-1 label: the check would be vacuous"
            else:
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                           msg=f"{backend} {name}")
        for grad, theirs in zip(grads, trl_grads, strict=True):
            assert relative_error(grad, theirs) < 1e-5, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_valid_row_propagates(backend):
    hidden, weight, bias, labels = random_case((6,), 8, 20, torch.float32, True)
    labels[2] = 5
    hidden[2, 1] = float("nan")
    out = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, outputs=ALL_OUTPUTS,
                                        softcap=3.0, backend=backend)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.isnan(getattr(out, name)[2]), name
        finite = torch.arange(6) != 2
        assert torch.isfinite(getattr(out, name)[finite]).all(), name
    assert not out.is_top1[2]


def test_entropy_flag_keeps_its_return_shapes():
    hidden, weight, bias, labels = random_case((4, 3), 8, 20, torch.float32, True)
    logprobs = pyalign.linear_token_logprobs(hidden, weight, labels, softcap=2.0)
    pair = pyalign.linear_token_logprobs(hidden, weight, labels, softcap=2.0, entropy=True)
    named = pyalign.linear_token_logprobs(hidden, weight, labels, softcap=2.0,
                                          outputs=("log_probs",))
    assert isinstance(logprobs, torch.Tensor) and logprobs.shape == (4, 3)
    assert isinstance(pair, tuple) and len(pair) == 2 and not hasattr(pair, "is_top1")
    assert named.entropy is None and named.is_top1 is None
    torch.testing.assert_close(named.log_probs, logprobs)
    torch.testing.assert_close(pair[0], logprobs)


# ---------------------------------------------------------------- memory_budget: no recompute

CHUNKED = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("kept_tokens", [45, 10, 1], ids=["all", "some", "one"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_memory_budget_equals_the_recompute_path(backend, kept_tokens, softcap):
    hidden, weight, bias, labels = random_case((45,), 16, 300, torch.float32, True)
    labels[20] = IGNORE
    hidden[20] = float("nan")  # an ignored padded row inside the kept block
    grad_logprobs, grad_entropy = torch.randn(45), torch.randn(45)
    common = dict(softcap=softcap, logit_scale=0.8, temperature=0.9, chunk_size=7,
                  backend=backend)
    reference, ref_grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                    **common)
    budget = kept_tokens * 300 * 4 + 3  # not a multiple of a row: it rounds down
    out, grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                          memory_budget=budget, **common)
    for name in ("log_probs",) + ALL_OUTPUTS:
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=1e-5,
                                   atol=1e-5, msg=name)
    for grad, expected in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all()
        assert relative_error(grad, expected) < 1e-5
    assert torch.all(grads[0][20] == 0)


@pytest.mark.parametrize("backend", CHUNKED)
def test_memory_budget_allows_one_backward(backend):
    hidden, weight, bias, labels = random_case((8,), 8, 30, torch.float32, True)
    hidden.requires_grad_(True)
    logprobs = pyalign.linear_token_logprobs(hidden, weight, labels, memory_budget=1 << 20,
                                             backend=backend)
    logprobs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="memory_budget"):
        logprobs.sum().backward()


@pytest.mark.parametrize("backend", CHUNKED)
def test_memory_budget_buffer_is_reused_across_calls_and_graphs(backend):
    """On CPU the kept logits' buffer is cached from one call's backward to the next call
    (pyalign/_workspace.py). Calls that shrink and grow it, a cached buffer NaN-poisoned before
    reuse, and two graphs alive at once (each must hold its own buffer) all match float64."""
    from pyalign import _workspace

    vocab, hidden_size, temperature = 300, 16, 0.9
    pyalign.empty_cache()

    def start(tokens):
        case = random_case((tokens,), hidden_size, vocab, torch.float32, True)
        leaves = [t.clone().requires_grad_(True) for t in case[:3]]  # hidden, weight, bias
        outputs = pyalign.linear_token_logprobs(leaves[0], leaves[1], case[3], bias=leaves[2],
                                                entropy=True, temperature=temperature,
                                                memory_budget=tokens * vocab * 4, backend=backend)
        return case, leaves, (torch.randn(tokens), torch.randn(tokens)), outputs

    def finish(call):
        case, leaves, upstream, outputs = call
        torch.autograd.backward(list(outputs), list(upstream))
        logprobs64, entropy64_, grads64_ = oracle(*case, *upstream, temperature)
        torch.testing.assert_close(outputs[0].double(), logprobs64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[1].double(), entropy64_, rtol=1e-5, atol=1e-5)
        for leaf, expected in zip(leaves, grads64_, strict=True):
            assert relative_error(leaf.grad, expected) < 1e-5

    for tokens in (40, 12, 40, 64):  # shrinks (a view of the cached buffer), then grows past it
        call = start(tokens)
        if ON_CPU:
            assert _workspace.cached_bytes() == 0  # the call holds the buffer
        finish(call)
        if ON_CPU:
            assert _workspace.cached_bytes() >= tokens * vocab * 4
            for flat in _workspace._free.values():
                flat.fill_(float("nan"))  # every element must be rewritten before it is read
    first, second = start(40), start(40)  # two graphs alive: two buffers
    finish(second)
    finish(first)
    if ON_CPU:
        with torch.no_grad():  # no backward to come: nothing is kept, the cache is left alone
            held = _workspace.cached_bytes()
            pyalign.linear_token_logprobs(torch.randn(8, hidden_size),
                                          torch.randn(vocab, hidden_size),
                                          torch.randint(0, vocab, (8,)), memory_budget=1 << 30,
                                          backend=backend)
            assert _workspace.cached_bytes() == held
        pyalign.empty_cache()
        assert _workspace.cached_bytes() == 0


def test_memory_budget_path_holds_the_kept_logits_and_little_else():
    """The budget path holds the kept [N, V] logits (here all of them) and about one chunk more;
    the default path stays under a few chunks (the test above); both far below eager."""
    tokens, vocab, hidden_size, chunk_size = 2048, 32000, 16, 256
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,))
    kept_bytes = tokens * vocab * 4
    for backend in CHUNKED:
        def budget(backend=backend):
            pyalign.linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size,
                                          memory_budget=kept_bytes, backend=backend
                                          ).sum().backward()

        def default(backend=backend):
            pyalign.linear_token_logprobs(hidden, weight, labels, backend=backend).sum().backward()

        hidden.grad = weight.grad = None
        pyalign.empty_cache()  # a buffer cached by an earlier call would hide the kept logits
        budget_peak = peak_allocated_bytes(budget)
        hidden.grad = weight.grad = None
        default_peak = peak_allocated_bytes(default)
        gradients = (tokens + vocab) * hidden_size * 4
        assert kept_bytes <= budget_peak < kept_bytes + 3 * chunk_size * vocab * 4 + gradients, (
            f"{backend}: budget peak {budget_peak / 2**20:.0f} MiB, kept {kept_bytes / 2**20:.0f}")
        # the default chunk is about 16 MiB of fp32 logits: one at a time (the eager epilogue
        # adds its two fp32 temporaries of about a chunk each, pyalign/eager/_rows.py)
        chunks = 2 if backend == "cpu" else 4
        assert default_peak < chunks * (1 << 24) + gradients, (
            f"{backend}: default peak {default_peak / 2**20:.0f} MiB")


# ---------------------------------------------------------------- bad options

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=-2.0), ValueError, "logit_scale"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(logit_scale=None), TypeError, "logit_scale"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(memory_budget=1.5), TypeError, "memory_budget"),
    (dict(outputs=("entropy", "logits")), ValueError, "unknown name 'logits'"),
    (dict(outputs="entropy"), TypeError, "outputs"),
    (dict(outputs=("entropy",), entropy=True), ValueError, "entropy=True or outputs"),
], ids=lambda value: str(value) if not isinstance(value, dict) else None)
def test_bad_head_options_are_clear_errors(kwargs, error, match):
    hidden, weight, _, labels = random_case((4,), 8, 20, torch.float32, False)
    with pytest.raises(error, match=match):
        pyalign.linear_token_logprobs(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("options", [
    dict(outputs=ALL_OUTPUTS, softcap=3.0, logit_scale=0.5),
    dict(outputs=("entropy",), memory_budget=1 << 20),
], ids=["outputs-softcap", "budget"])
def test_torch_compile_fullgraph_matches_eager_call(options):
    hidden, weight, bias, labels = random_case((16,), 8, 50, torch.float32, True)

    def objective(h, w):
        out = pyalign.linear_token_logprobs(h, w, labels, bias=bias, **options)
        return (out.log_probs * 2).sum() + out.entropy.sum()

    results = []
    for function in (objective, torch.compile(objective, fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        value = function(*leaves)
        value.backward()
        results.append((value.detach(), [leaf.grad for leaf in leaves]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for compiled, plain in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_slices_carry_no_probability(backend):
    """A bias of -inf over whole vocabulary slices (the chunked backends walk the vocabulary in
    slices: chunk_size=2 gives 8-column slices here) and inside one: every output and gradient
    equals float64 of the model without those columns; their weight rows get zero gradient."""
    hidden, weight, bias, labels = random_case((12,), 8, 48 if backend != "triton" else 40,
                                               torch.float32, True)
    vocab = weight.shape[0]
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[8:24] = True   # two whole slices
    masked[30] = True     # one column inside a slice
    bias = torch.where(masked, float("-inf"), bias)
    kept_columns = (~masked).nonzero().squeeze(1)
    remap = torch.full((vocab,), -1, dtype=torch.int64)
    remap[kept_columns] = torch.arange(kept_columns.numel())
    valid = labels != IGNORE
    labels = torch.where(valid, kept_columns[torch.randint(0, kept_columns.numel(), (12,))], IGNORE)
    grad_logprobs, grad_entropy = torch.randn(12), torch.randn(12)
    # no softcap: it maps a -inf logit to -softcap (tanh saturates), as TRL's does
    out, grads = run_head(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                          logit_scale=0.5, temperature=0.8, chunk_size=2, backend=backend)
    small_labels = torch.where(valid, remap[labels.clamp(min=0)], IGNORE)
    expected, exp_grads = head_oracle(hidden, weight[kept_columns], bias[kept_columns],
                                      small_labels, grad_logprobs, grad_entropy, None, 0.5, 0.8)
    for name in ("log_probs", "log_sum_sq_probs", "entropy"):
        torch.testing.assert_close(getattr(out, name).double(), expected[name], rtol=1e-5,
                                   atol=2e-5, msg=name)
    # the mean runs over the whole vocabulary: -inf where any logit is -inf (as TRL's)
    assert torch.all(torch.isneginf(out.mean_logits[valid]))
    assert torch.equal(out.is_top1, expected["is_top1"])
    assert relative_error(grads[0], exp_grads[0]) < 5e-5
    assert relative_error(grads[1][kept_columns], exp_grads[1]) < 5e-5
    assert torch.all(grads[1][masked] == 0) and torch.all(grads[2][masked] == 0)
