"""The C++ ops (torch.ops.pyalign_C, csrc/cpu) called directly, for what the public API cannot
reach: the ``_out`` variants writing into poisoned buffers (equal to the allocating ones), the
row stats (max, log-sum-exp) the log-prob forward returns, the in-place backward op itself, the ops' own input
checks, the vectorized exp, multi-tensor chunk sizes, the CUDA launch plan. Everything the
public API reaches is tested through it in tests/ops/."""
import math

import pytest
import torch

from support import IGNORE, grads64, kl64, poison_, token_logprobs_and_grad64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of forward values and of gradients, per input dtype.
TOL = {
    torch.float32: dict(fwd=(1e-5, 1e-5), bwd=(1e-4, 1e-6)),
    torch.bfloat16: dict(fwd=(1e-5, 2e-5), bwd=(1e-2, 1e-5)),
    torch.float16: dict(fwd=(1e-5, 2e-5), bwd=(2e-3, 1e-6)),
}


def make_case(rows, vocab, dtype):
    """Logits with a masked vocabulary (-inf, never on the label) in every third row; labels at
    0, V-1 and ignore_index."""
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[0], labels[-1] = 0, vocab - 1
    if rows > 2:
        labels[1] = IGNORE
    if vocab > 4:
        for row in range(0, rows, 3):
            cols = torch.randperm(vocab)[: vocab // 3]
            logits[row, cols[cols != labels[row]]] = -math.inf
    return logits, labels


def check_close(actual, expected, tol, what):
    rtol, atol = tol
    assert not torch.isnan(actual.double()).any(), f"{what}: NaN in output"
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(9, 1), (33, 1000), (6, 5003)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_out_variants_lse_and_inplace_op(cpu_ops, dtype, rows, vocab, with_entropy):
    logits, labels = make_case(rows, vocab, dtype)
    grad_logprobs = torch.randn(rows)
    grad_entropy = torch.randn(rows) if with_entropy else None
    logprobs64, entropy64, grad64 = token_logprobs_and_grad64(
        logits, labels, grad_logprobs, grad_entropy, IGNORE, 0.7)
    outs = [poison_(torch.empty(n)) for n in (rows, rows if with_entropy else 0, (rows, 2))]
    cpu_ops.logprobs_forward_out(logits, labels, IGNORE, 0.7, with_entropy, *outs)
    allocated = cpu_ops.logprobs_forward(logits, labels, IGNORE, 0.7, with_entropy)
    for out, alloc in zip(outs, allocated, strict=False):
        assert alloc.dtype == torch.float32 and torch.equal(out, alloc)
    logprobs, entropy, lse = outs
    check_close(logprobs, logprobs64, TOL[dtype]["fwd"], "logprobs")
    # lse: the row stats (m, log sum exp((z - m) / T)), m the max of the raw logits, ignored rows
    # (never read) (0, 0); m / T + L is logsumexp(z / T)
    valid = labels != IGNORE
    row_max = logits.double().amax(-1)
    log_sum = torch.logsumexp((logits.double() - row_max[:, None]) / 0.7, -1)
    assert lse.shape == (rows, 2)
    assert torch.all(lse[~valid] == 0)
    check_close(lse[valid, 0], row_max[valid], TOL[dtype]["fwd"], "row max")
    check_close(lse[valid, 1], log_sum[valid], TOL[dtype]["fwd"], "log sum exp")
    check_close(lse[valid, 0].double() / 0.7 + lse[valid, 1],
                torch.logsumexp(logits.double() / 0.7, -1)[valid], TOL[dtype]["fwd"], "lse")
    if with_entropy:
        check_close(entropy, entropy64, TOL[dtype]["fwd"], "entropy")
    entropy = entropy if with_entropy else None
    grad = poison_(torch.empty_like(logits))
    cpu_ops.logprobs_backward_out(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                  IGNORE, 0.7, grad)
    allocated = cpu_ops.logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy,
                                          IGNORE, 0.7)
    assert allocated.dtype == dtype and torch.equal(allocated, grad)
    check_close(grad, grad64, TOL[dtype]["bwd"], "grad_logits")
    in_place = logits.clone()
    cpu_ops.logprobs_backward_(grad_logprobs, grad_entropy, in_place, labels, lse, entropy,
                               IGNORE, 0.7)
    assert torch.equal(in_place, grad), "in-place backward differs from the out-of-place one"


def test_logprobs_op_input_checks(cpu_ops):
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


def test_exp_matches_float64(cpu_ops):
    """The vectorized exp the kernels use: <= 2 ulp on its domain, 0 below it, NaN kept."""
    x = torch.cat([torch.linspace(-87.0, 0.5, 200001), -torch.rand(1000) * 1e-6])
    approx = cpu_ops.exp_nonpositive(x).double()
    exact = x.double().exp()
    assert ((approx - exact).abs() / exact).max() < 2.5e-7
    special = cpu_ops.exp_nonpositive(torch.tensor([-math.inf, -1000.0, -87.5, math.nan, 0.0]))
    assert special[:3].eq(0).all() and torch.isnan(special[3]) and special[4] == 1.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_kl_out_variants(cpu_ops, estimator, dtype, masked):
    shape = (3, 1001)
    logprobs = (-torch.rand(shape) * 5).to(dtype)
    ref_logprobs = (logprobs.float() + torch.randn(shape)).to(dtype)
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
    for got, alloc in zip((grad_lp, grad_ref),
                          cpu_ops.kl_backward(grad_kl, logprobs, ref_logprobs, mask, estimator),
                          strict=True):
        assert torch.equal(got, alloc)


def test_kl_op_input_checks(cpu_ops):
    logprobs, ref_logprobs = -torch.rand(10), -torch.rand(10)
    with pytest.raises(RuntimeError, match="k1, k2 or k3"):
        cpu_ops.kl_forward(logprobs, ref_logprobs, None, "k4")
    with pytest.raises(RuntimeError, match="shape"):
        cpu_ops.kl_forward(logprobs, ref_logprobs[:5], None, "k1")
    with pytest.raises(RuntimeError, match="bool"):
        cpu_ops.kl_forward(logprobs, ref_logprobs, torch.ones(10), "k1")
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_ops.kl_forward(logprobs.double(), ref_logprobs, None, "k1")


def expected_after(kind, target, source, scalar):
    if kind == "lerp":
        return (target.double() + scalar * (source.double() - target.double())).to(target.dtype)
    return source.double().to(target.dtype)


def assert_updated(kind, targets, befores, sources, scalar):
    for i, (target, before, source) in enumerate(zip(targets, befores, sources, strict=False)):
        # fp32 math then one rounding vs fp64 math then one rounding: at most one ulp apart
        rtol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[target.dtype]
        torch.testing.assert_close(target, expected_after(kind, before, source, scalar), rtol=rtol,
                                   atol=1e-6, msg=lambda m, i=i: f"tensor {i}: {m}")


# (lerp, 0.005) is what pyalign.ema_(decay=0.995) sends: the kernels implement lerp and copy only
@pytest.mark.parametrize("kind,scalar", [("lerp", 0.005), ("lerp", 0.5), ("copy", 0.0)])
@pytest.mark.parametrize("chunk_size", [8, 24, 1 << 16])
def test_chunk_boundaries_and_unaligned_views(cpu_ops, kind, scalar, chunk_size):
    """Chunks of 8/24 elements put boundaries and vector tails everywhere; views at an odd
    element offset are not 16-byte aligned and take the scalar path."""
    storage_t, storage_s = torch.randn(5000), torch.randn(5000).bfloat16()
    targets = [torch.randn(n) for n in (5, 8, 9, 100, 257)] + [storage_t[1:4001], storage_t[4003:4100]]
    sources = [torch.randn(n).half() for n in (5, 8, 9, 100, 257)] + [storage_s[3:4003], storage_s[1:98]]
    befores = [t.clone() for t in targets]
    storage_before = storage_t.clone()
    cpu_ops.multi_tensor_apply_(kind, targets, sources, scalar, chunk_size)
    assert_updated(kind, targets, befores, sources, scalar)
    for index in (0, 4001, 4002, *range(4100, 5000)):  # outside the views: untouched
        assert storage_t[index] == storage_before[index]


def test_multi_tensor_op_input_checks(cpu_ops):
    with pytest.raises(RuntimeError, match="1 targets but 2 sources"):
        cpu_ops.multi_tensor_apply_("lerp", [torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="3 target elements but 4 source"):
        cpu_ops.multi_tensor_apply_("lerp", [torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(RuntimeError, match="not contiguous"):
        cpu_ops.multi_tensor_apply_("lerp", [torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9)
    with pytest.raises(RuntimeError, match="unsupported dtypes"):
        cpu_ops.multi_tensor_apply_("lerp", [torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="kind must be"):
        cpu_ops.multi_tensor_apply_("swap", [torch.zeros(3)], [torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match=r"kind must be lerp or copy \(ema runs as lerp\)"):
        cpu_ops.multi_tensor_apply_("ema", [torch.zeros(3)], [torch.zeros(3)], 0.9)


def python_plan(numels, chunk_size, max_tensors, max_blocks):
    """Independent statement of the launch-packing rule the CUDA launcher uses."""
    launches, tensors, blocks = [], [], []
    for index, numel in enumerate(numels):
        for chunk in range(-(-numel // chunk_size)):
            if not tensors or tensors[-1] != index:
                if len(tensors) == max_tensors:
                    launches.append((tensors, blocks))
                    tensors, blocks = [], []
                tensors.append(index)
            blocks.append((len(tensors) - 1, chunk))
            if len(blocks) == max_blocks:
                launches.append((tensors, blocks))
                tensors, blocks = [], []
    if blocks:
        launches.append((tensors, blocks))
    return launches


def parse_plan(flat):
    launches, pos = [], 0
    while pos < len(flat):
        count = flat[pos]
        tensors = flat[pos + 1: pos + 1 + count]
        pos += 1 + count
        nblocks = flat[pos]
        pairs = flat[pos + 1: pos + 1 + 2 * nblocks]
        pos += 1 + 2 * nblocks
        launches.append((tensors, list(zip(pairs[0::2], pairs[1::2], strict=False))))
    return launches


@pytest.mark.parametrize("max_tensors,max_blocks", [(48, 320), (3, 5), (1, 1)])
def test_cuda_launch_plan_covers_every_chunk_once(cpu_ops, max_tensors, max_blocks):
    numels = [0, 1, 4096, 4097, 0, 100_000, 7, 65_536 * 3 + 1] + [5] * 60
    chunk_size = 4096
    plan = parse_plan(cpu_ops.multi_tensor_plan(numels, chunk_size, max_tensors, max_blocks))
    assert plan == python_plan(numels, chunk_size, max_tensors, max_blocks)
    seen = []
    for tensors, blocks in plan:
        assert 0 < len(tensors) <= max_tensors and 0 < len(blocks) <= max_blocks
        seen += [(tensors[slot], chunk) for slot, chunk in blocks]
    assert seen == [(i, c) for i, n in enumerate(numels) for c in range(-(-n // chunk_size))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_backward_columns_is_the_slice_of_the_whole_gradient(cpu_ops, dtype,
                                                                      with_entropy):
    """The column-slice backward (the vocabulary walk of linear_logprobs) on logits[:, c0:c1],
    with the whole rows' stats, against float64's gradient of the whole rows, sliced: the label
    term only in the slice that holds the label, ignored rows exactly 0."""
    rows, vocab = 9, 70
    logits, labels = make_case(rows, vocab, dtype)
    labels[4] = 33  # inside the middle slice
    grad_logprobs, grad_entropy = torch.randn(rows), torch.randn(rows)
    _, entropy, lse = cpu_ops.logprobs_forward(logits, labels, IGNORE, 0.7, with_entropy)
    _, _, grad64 = token_logprobs_and_grad64(logits, labels, grad_logprobs,
                                             grad_entropy if with_entropy else None,
                                             temperature=0.7)
    for c0, c1 in ((0, 30), (30, 41), (41, 70)):
        wide = poison_(torch.empty(rows, vocab + 5, dtype=dtype))
        wide[:, :c1 - c0] = logits[:, c0:c1]
        view = wide[:, :c1 - c0]  # row stride > width: a slice of a wider buffer
        cpu_ops.logprobs_backward_columns_(grad_logprobs,
                                           grad_entropy if with_entropy else None, view, labels,
                                           lse, entropy if with_entropy else None, IGNORE, 0.7,
                                           c0)
        check_close(view, grad64[:, c0:c1], TOL[dtype]["bwd"], f"columns {c0}:{c1}")
        assert torch.all(view[labels == IGNORE] == 0)
