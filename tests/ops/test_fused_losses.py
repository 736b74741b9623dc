"""The 3-matmul scalar losses (pyalign/ops/_fused_head.py) of linear_preference_loss and
linear_kto_loss: with reduction "mean"/"sum" and a gradient wanted, the loss and its gradients
come from one chunked forward. They must equal the recompute path (reduction="none", reduced
here: per-token log-probs by linear_token_logprobs, 4 matmuls) in value, metrics and gradients
wrt hidden, weight and bias, and the float64 oracle of tests/support.py; hold at most a few
chunks of logits; run 3 matmuls; scale with the upstream gradient; refuse bad input.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pyalign
from pyalign import losses
from pyalign.ops import linear_preference
from support import (
    DEVICE,
    IGNORE,
    ON_CPU,
    backends_for,
    grads64,
    kl_reference64,
    linear_logits64,
    peak_allocated_bytes,
    sequence_logprobs64,
    token_logprobs64,
    token_preference64,
    unpaired64,
)

BACKENDS = backends_for("linear_logprobs")
BATCH_LEVEL = tuple(name for name in losses.PAIRWISE_NAMES if losses.REGISTRY[name].batch_step)
PER_PAIR = tuple(name for name in losses.PAIRWISE_NAMES if name not in BATCH_LEVEL)
SMOOTHING = {name: 0.1 for name in losses.LABEL_SMOOTHING_NAMES}
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64: the two paths differ by summation order only
FP32 = dict(rtol=1e-5, atol=1e-5)


def head_case(rows, seq_len=6, hidden_size=8, vocab=23, dtype=torch.float64, bias=True, seed=0):
    """Hidden states, head, bias and labels with a prompt, a short row and a fully ignored row."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq_len, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / 2
    head_bias = torch.randn(vocab, generator=generator) if bias else None
    labels = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    labels[:, :2] = IGNORE  # the prompt
    if rows > 1:
        labels[1, seq_len - 2:] = IGNORE  # padding
    if rows > 3:
        labels[3] = IGNORE  # nothing kept
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=generator)
    ref_weight = weight + 0.1 * torch.randn(weight.shape, generator=generator)
    move = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return (move(hidden), move(weight), move(head_bias), labels.to(DEVICE), move(ref_hidden),
            move(ref_weight))


def run(op, reduction, hidden, weight, bias, *args, upstream=1.0, **kwargs):
    """(loss, metrics, grads of hidden/weight/bias) with ``reduction``; "none" is reduced here
    (mean), which is the recompute path."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True)
              for t in (hidden, weight, bias)]
    out = op(leaves[0], leaves[1], *args, bias=leaves[2], reduction=reduction, **kwargs)
    loss = out.loss.mean() if reduction == "none" else out.loss
    (loss * upstream).backward()
    return loss.detach(), tuple(out[1:]), [None if t is None else t.grad for t in leaves]


def assert_same(actual, expected, tol):
    loss, metrics, grads = actual
    exp_loss, exp_metrics, exp_grads = expected
    torch.testing.assert_close(loss, exp_loss, **tol)
    for metric, exp_metric in zip(metrics, exp_metrics, strict=True):
        torch.testing.assert_close(metric, exp_metric, **tol)
    for grad, exp_grad in zip(grads, exp_grads, strict=True):
        if exp_grad is None:
            assert grad is None
        else:
            torch.testing.assert_close(grad, exp_grad, **tol)


def preference_kwargs(ref, labels, ref_hidden, ref_weight, average, **extra):
    if ref == "hidden":
        return dict(ref_hidden=ref_hidden, ref_weight=ref_weight, average_log_prob=average, **extra)
    with torch.no_grad():
        tokens = token_logprobs64(linear_logits64(ref_hidden, ref_weight), labels.cpu())
        ref_logps = sequence_logprobs64(tokens, labels.cpu() != IGNORE, average)
    return dict(ref_logps=ref_logps.to(DEVICE, ref_hidden.dtype), average_log_prob=average, **extra)


# ------------------------------------------------------------------ preference: every loss

@pytest.mark.parametrize("ref", ["logps", "hidden"])
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("loss", losses.PAIRWISE_NAMES)
def test_every_pairwise_loss_equals_the_recompute_path_float64(loss, average, ref):
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(6)
    kwargs = preference_kwargs(ref, labels, ref_hidden, ref_weight, average, loss=loss, beta=0.3,
                               label_smoothing=SMOOTHING.get(loss, 0.0), chunk_size=9)
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    recompute = run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels, **kwargs)
    assert_same(fused, recompute, EXACT)


COMBINATIONS = [
    dict(loss=["sigmoid", "bco_pair", "ipo"], loss_weights=[0.8, 0.2, 0.5]),
    dict(loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO: batch-level sft
    dict(loss="sigmoid_norm", f_divergence="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss=["sigmoid", "hinge"], f_divergence="js_divergence"),
    dict(loss="sigmoid", ld_alpha=0.5),
    dict(loss=["sigmoid", "apo_zero"], use_weighting=True),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_combinations_and_token_options_equal_the_recompute_path(options, reduction):
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(8, seed=1)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.2, chunk_size=5, **options)
    fused = run(pyalign.linear_preference_loss, reduction, hidden, weight, bias, labels, **kwargs)
    recompute = run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels, **kwargs)
    if reduction == "sum":  # run() means the per-pair losses; the sum is B times that
        recompute = (recompute[0] * 4, recompute[1], [g * 4 for g in recompute[2]])
    assert_same(fused, recompute, EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,ref", [("sigmoid", "hidden"), ("ipo", "logps"), ("exo_pair", "hidden")])
def test_float32_every_backend_equals_recompute_and_float64(backend, loss, ref):
    small = backend == "triton" and ON_CPU
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(
        4, seq_len=5 if small else 9, vocab=17 if small else 41, dtype=torch.float32, seed=2)
    eps = SMOOTHING.get(loss, 0.0)
    kwargs = preference_kwargs(ref, labels, ref_hidden, ref_weight, False, loss=loss, beta=0.5,
                               label_smoothing=eps, chunk_size=7, backend=backend)
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    recompute = run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels, **kwargs)
    assert_same(fused, recompute, FP32)
    mask = labels != IGNORE
    with torch.no_grad():
        ref_tokens = token_logprobs64(linear_logits64(ref_hidden, ref_weight), labels)
        ref_logps = sequence_logprobs64(ref_tokens, mask)
    expected, exp_grads = grads64(
        lambda h, w, b: token_preference64(token_logprobs64(linear_logits64(h, w, b), labels),
                                           ref_logps, mask, [loss], 0.5,
                                           eps_of=lambda _: eps).mean(),
        [hidden, weight, bias])
    torch.testing.assert_close(fused[0].double(), expected, **FP32)
    for grad, exp_grad in zip(fused[2], exp_grads, strict=True):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-4, atol=1e-5)
    assert torch.all(fused[2][0][~mask] == 0)


def test_bfloat16_matches_float64_loosely():
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4, seq_len=8, vocab=31,
                                                                     dtype=torch.bfloat16, seed=3)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.5, chunk_size=6)
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    recompute = run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels, **kwargs)
    assert fused[2][0].dtype == torch.bfloat16 and fused[2][1].dtype == torch.bfloat16
    assert_same(fused, recompute, dict(rtol=2e-2, atol=2e-2))
    mask = labels != IGNORE
    ref_logps = sequence_logprobs64(token_logprobs64(linear_logits64(ref_hidden, ref_weight),
                                                     labels), mask)
    expected, exp_grads = grads64(
        lambda h, w, b: token_preference64(token_logprobs64(linear_logits64(h, w, b), labels),
                                           ref_logps, mask, ["sigmoid"], 0.5).mean(),
        [hidden, weight, bias])
    torch.testing.assert_close(fused[0].double(), expected, rtol=2e-2, atol=2e-2)
    for grad, exp_grad in zip(fused[2], exp_grads, strict=True):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize("pairs,seq_len,chunk_size", [(1, 1, None), (1, 7, 1), (3, 5, 4),
                                                      (5, 3, 1000)])
def test_one_pair_odd_sizes_and_chunkings(pairs, seq_len, chunk_size):
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(2 * pairs, seq_len=seq_len,
                                                                     seed=4)
    labels[0, -1] = 3  # at least one kept token
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, chunk_size=chunk_size)
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    recompute = run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels, **kwargs)
    assert_same(fused, recompute, EXACT)


def test_poison_at_ignored_positions_is_inert():
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(6, seed=5)
    ignored = labels == IGNORE
    hidden[ignored] = float("nan")
    ref_hidden[ignored] = float("inf")
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels,
                ref_hidden=ref_hidden, ref_weight=ref_weight, chunk_size=4)
    assert torch.isfinite(fused[0])
    assert all(torch.isfinite(grad).all() for grad in fused[2])
    assert torch.all(fused[2][0][ignored] == 0)


# ------------------------------------------------------------------------- KTO

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref", ["logps", "hidden"])
@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
def test_kto_equals_recompute_and_float64(backend, loss, ref):
    small = backend == "triton" and ON_CPU
    dtype = torch.float64 if backend == "eager" else torch.float32
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(
        5, seq_len=5 if small else 7, vocab=13 if small else 29, dtype=dtype, seed=6)
    desirable = torch.tensor([True, False, True, False, False], device=DEVICE)
    kl = torch.rand(4, device=DEVICE, dtype=dtype) * 0.3
    mask = labels != IGNORE
    with torch.no_grad():
        ref_logps = sequence_logprobs64(token_logprobs64(linear_logits64(ref_hidden, ref_weight),
                                                         labels), mask)
    kwargs = (dict(ref_hidden=ref_hidden, ref_weight=ref_weight) if ref == "hidden"
              else dict(ref_logps=ref_logps.to(dtype)))
    kwargs.update(kl=kl, loss=loss, beta=0.4, desirable_weight=1.3, undesirable_weight=0.7,
                  chunk_size=6, backend=backend)
    args = (labels, desirable)
    fused = run(pyalign.linear_kto_loss, "mean", hidden, weight, bias, *args, **kwargs)
    recompute = run(pyalign.linear_kto_loss, "none", hidden, weight, bias, *args, **kwargs)
    assert_same(fused, recompute, EXACT if dtype == torch.float64 else FP32)
    z0 = kl_reference64(kl)
    expected, exp_grads = grads64(
        lambda h, w, b: unpaired64(sequence_logprobs64(token_logprobs64(
            linear_logits64(h, w, b), labels), mask), ref_logps, desirable, z0, loss, 0.4,
            1.3, 0.7).mean(), [hidden, weight, bias])
    torch.testing.assert_close(fused[0].double(), expected, **FP32)
    for grad, exp_grad in zip(fused[2], exp_grads, strict=True):
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
def test_kto_with_kl_pairs_from_hidden_states(average):
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4, seed=7)
    kl_hidden, _, _, kl_labels, ref_kl_hidden, _ = head_case(3, seed=8)
    desirable = torch.tensor([True, True, False, True], device=DEVICE)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, kl_hidden=kl_hidden,
                  kl_labels=kl_labels, ref_kl_hidden=ref_kl_hidden, average_log_prob=average,
                  chunk_size=3)
    fused = run(pyalign.linear_kto_loss, "sum", hidden, weight, bias, labels, desirable, **kwargs)
    recompute = run(pyalign.linear_kto_loss, "none", hidden, weight, bias, labels, desirable,
                    **kwargs)
    recompute = (recompute[0] * 4, recompute[1], [g * 4 for g in recompute[2]])
    assert_same(fused, recompute, EXACT)


# -------------------------------------------------------- which path, its cost, its memory

def test_the_fused_path_never_calls_the_per_token_op(monkeypatch):
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4)

    def refuse(*args, **kwargs):
        raise AssertionError("the 3-matmul path called linear_token_logprobs")

    monkeypatch.setattr(linear_preference, "linear_token_logprobs", refuse)
    run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels,
        ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(AssertionError, match="called linear_token_logprobs"):  # the fallbacks do
        run(pyalign.linear_preference_loss, "none", hidden, weight, bias, labels,
            ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(AssertionError, match="called linear_token_logprobs"):
        run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels,
            ref_hidden=ref_hidden, ref_weight=ref_weight, loss="aot")


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def matmul_flops(function):
    """Flops of every matmul ``function`` runs (the in-place addmm_ that accumulates a weight
    gradient included: FlopCounterMode does not count it by itself)."""
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("frozen_head", [False, True])
def test_three_matmuls_on_the_kept_tokens_only(frozen_head):
    """Forward + backward cost exactly 3 (2 with a frozen head) matmuls of kept tokens x H x V
    with precomputed reference log-probs, one more with the reference from hidden states."""
    hidden, weight, _, labels, ref_hidden, ref_weight = head_case(6, seq_len=8, vocab=40)
    kept = int((labels != IGNORE).sum())
    one_matmul = 2 * kept * hidden.shape[-1] * weight.shape[0]
    ref_logps = torch.randn(6, device=DEVICE, dtype=hidden.dtype)
    hidden_leaf = hidden.clone().requires_grad_(True)
    weight_leaf = weight if frozen_head else weight.clone().requires_grad_(True)
    for kwargs, reference_matmuls in ((dict(ref_logps=ref_logps), 0),
                                      (dict(ref_hidden=ref_hidden, ref_weight=ref_weight), 1)):
        flops = matmul_flops(lambda kwargs=kwargs: pyalign.linear_preference_loss(
            hidden_leaf, weight_leaf, labels, chunk_size=5, **kwargs).loss.backward())
        assert flops == (2 + (not frozen_head) + reference_matmuls) * one_matmul
    assert weight_leaf.grad is None if frozen_head else weight_leaf.grad is not None


def test_memory_stays_bounded():
    """4096 tokens, V=32000: the full fp32 logits are 524 MB; the 3-matmul path with 256-token
    chunks holds a few chunks of logits (33 MB each) plus the gradient buffers, with the
    reference scored in the same loop."""
    pairs, seq_len, vocab, hidden_size, chunk_size = 32, 64, 32000, 16, 256
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=generator).to(DEVICE)
    ref_hidden = hidden + 0.1
    weight = (torch.randn(vocab, hidden_size, generator=generator) / 4).to(DEVICE)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator).to(DEVICE)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    full_logits_bytes = 2 * pairs * seq_len * vocab * 4
    chunk_bytes = chunk_size * vocab * 4

    def fused():
        pyalign.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                       ref_weight=weight.detach(), chunk_size=chunk_size,
                                       backend="eager").loss.backward()

    peak = peak_allocated_bytes(fused)
    assert hidden.grad is not None and weight.grad is not None
    assert peak < 4 * chunk_bytes, (f"peak {peak / 1e6:.0f} MB, one chunk of logits "
                                    f"{chunk_bytes / 1e6:.0f} MB, all {full_logits_bytes / 1e6:.0f} MB")


@pytest.mark.parametrize("reference", ["hidden", "precomputed"])
def test_peak_is_one_weight_gradient_and_one_chunk(reference):
    """A head much larger than a chunk's logits (H=256, V=8000: W is 7.8 MiB, a pair's logits
    0.7 MiB): forward + backward hold W's gradient once (backward scales the stored buffer in
    place and hands it over as weight.grad; a copy would make it twice), hidden's, and a few
    buffers of a chunk's logits at a time (the logits, the eager backend's softmax temporaries)."""
    pairs, seq_len, hidden_size, vocab = 3, 16, 256, 8000
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=generator).to(DEVICE)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / 16).to(DEVICE)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator).to(DEVICE)
    labels[:, :4] = IGNORE
    kwargs = (dict(ref_hidden=hidden + 0.1, ref_weight=weight + 0.01) if reference == "hidden"
              else dict(ref_logps=torch.randn(2 * pairs, generator=generator).to(DEVICE) - 50))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    pair_logits_bytes = 2 * (seq_len - 4) * vocab * 4

    def fused():
        pyalign.linear_preference_loss(hidden, weight, labels, chunk_size=1, backend="eager",
                                       **kwargs).loss.backward()

    peak = peak_allocated_bytes(fused)
    assert hidden.grad is not None and weight.grad is not None
    bound = weight.numel() * 4 + hidden.numel() * 4 + 4 * pair_logits_bytes
    assert peak < bound, (f"peak {peak / 2**20:.1f} MiB, W {weight.numel() * 4 / 2**20:.1f} MiB, "
                          f"a pair's logits {pair_logits_bytes / 2**20:.1f} MiB")


# --------------------------------------------------------- autograd semantics, compile, errors

def test_upstream_scalar_and_backward_twice_scale_the_stored_gradients():
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    once = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    scaled = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels,
                 upstream=-2.5, **kwargs)
    for grad, base in zip(scaled[2], once[2], strict=True):
        torch.testing.assert_close(grad, -2.5 * base, **EXACT)
    leaf = hidden.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(leaf, weight, labels, bias=bias, **kwargs)
    out.loss.backward(retain_graph=True)
    out.loss.backward()  # accumulates: twice the gradient, the stored one untouched
    torch.testing.assert_close(leaf.grad, 2 * once[2][0], **EXACT)
    with pytest.raises(RuntimeError, match="retain_graph=True"):  # as any op with saved tensors
        out.loss.backward()
    out = pyalign.linear_preference_loss(leaf, weight, labels, bias=bias, **kwargs)
    total = out.loss * 3 + out.loss  # one loss used twice in a graph
    leaf.grad = None
    total.backward()
    torch.testing.assert_close(leaf.grad, 4 * once[2][0], **EXACT)


def test_no_grad_and_compiled_calls_give_the_same_loss():
    """Without a gradient (and under torch.compile) the recompute path runs: same numbers."""
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4, dtype=torch.float32)
    kwargs = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, loss="sigmoid", beta=0.3)
    fused = run(pyalign.linear_preference_loss, "mean", hidden, weight, bias, labels, **kwargs)
    with torch.no_grad():
        no_grad = pyalign.linear_preference_loss(hidden, weight, labels, bias=bias, **kwargs)
    torch.testing.assert_close(no_grad.loss, fused[0], **FP32)

    def objective(h, w):
        return pyalign.linear_preference_loss(h, w, labels, bias=bias, **kwargs).loss

    torch._dynamo.reset()
    try:
        compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        value = compiled(*leaves)
        value.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(value.detach(), fused[0], **FP32)
    for leaf, grad in zip(leaves, fused[2][:2], strict=True):
        torch.testing.assert_close(leaf.grad, grad, **FP32)


def test_reference_head_is_required_and_chunk_size_checked():
    hidden, weight, bias, labels, ref_hidden, ref_weight = head_case(4)
    leaf = hidden.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="ref_hidden given without ref_weight"):
        pyalign.linear_preference_loss(leaf, weight, labels, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="ref_hidden given without ref_weight"):
        pyalign.linear_kto_loss(leaf, weight, labels, torch.ones(4, dtype=torch.bool),
                                ref_hidden=ref_hidden, kl=torch.zeros(()))
    for bad in (0, -3, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="chunk_size"):
            pyalign.linear_preference_loss(leaf, weight, labels, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, chunk_size=bad)
        with pytest.raises((ValueError, TypeError), match="chunk_size"):
            pyalign.linear_kto_loss(leaf, weight, labels, torch.ones(4, dtype=torch.bool),
                                    ref_hidden=ref_hidden, ref_weight=ref_weight,
                                    kl=torch.zeros(()), chunk_size=bad)
    labels[0, -1] = weight.shape[0]
    with pytest.raises(ValueError, match="labels out of range"):
        pyalign.linear_preference_loss(leaf, weight, labels, ref_hidden=ref_hidden,
                                       ref_weight=ref_weight)
