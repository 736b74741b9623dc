"""pyalign.bema_ (BEMA's fused update: ema <- (1 - beta) ema + beta param, stored, then
target <- ema + alpha (param - init)) on every backend of the test device against the float64
formulas of tests/support.py: every (target, state, param) dtype triple at awkward sizes in one
call with NaN-poisoned targets, the endpoints beta = 0 / 1 and alpha = 0, unaligned views and
chunk boundaries, NaN staying in its element, results independent of the thread count,
float64 / strided tensors on the eager path; aliasing and bad input refused before any update."""
import itertools

import pytest
import torch

import pyalign
from pyalign import backends
from support import (
    DEVICE,
    ON_CPU,
    assert_rounded_from,
    backends_for,
    bema_ema64,
    bema_weights64,
    poison_,
    same_under_thread_counts,
)

BACKENDS = backends_for("weights")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [0, 1, 7, 33, 1023, 65537]


def make_group(size, target_dtype, state_dtype, param_dtype):
    """(target poisoned with NaN, ema, param, init) of one size; param away from ema and init."""
    target = poison_(torch.empty(size, dtype=target_dtype))
    ema, init = torch.randn(size).to(state_dtype), torch.randn(size).to(state_dtype)
    return target, ema, torch.randn(size).to(param_dtype), init


def run_and_check(groups, alpha, beta, backend):
    """Run bema_ on ``groups`` and check every written tensor against the float64 formulas."""
    emas_before = [group[1].clone() for group in groups]
    reads_before = [(group[2].clone(), group[3].clone()) for group in groups]
    pyalign.bema_(*map(list, zip(*groups)), alpha=alpha, beta=beta, backend=backend)
    for (target, ema, param, init), before, reads in zip(groups, emas_before, reads_before, strict=True):
        name = f"{target.dtype}/{ema.dtype}/{param.dtype} [{target.numel()}]"
        assert torch.equal(param, reads[0]) and torch.equal(init, reads[1]), name  # read only
        assert_rounded_from(ema, bema_ema64(before, param, beta), (before, param), "ema " + name)
        # the weights come from the ema as stored (its own rounding already checked above)
        assert_rounded_from(target, bema_weights64(ema, param, init, alpha),
                            (ema, alpha * param.double(), alpha * init.double()), "target " + name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,beta", [(0.63, 0.0316), (0.2, 0.9)])
def test_every_dtype_triple_at_odd_sizes_in_one_call(backend, alpha, beta):
    groups = [make_group(size, *dtypes) for dtypes, size
              in itertools.product(itertools.product(DTYPES, DTYPES, DTYPES), ODD_SIZES)]
    run_and_check(groups, alpha, beta, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_endpoints(backend):
    """beta = 0 leaves the ema exactly; beta = 1 makes it the param exactly; alpha = 0 makes the
    target the (stored) ema exactly."""
    groups = [make_group(size, torch.float32, torch.float32, torch.float32) for size in (5, 4099)]
    emas = [group[1].clone() for group in groups]
    pyalign.bema_(*map(list, zip(*groups)), alpha=0.0, beta=0.0, backend=backend)
    for (target, ema, _, _), before in zip(groups, emas, strict=True):
        assert torch.equal(ema, before) and torch.equal(target, before)
    pyalign.bema_(*map(list, zip(*groups)), alpha=0.5, beta=1.0, backend=backend)
    for _, ema, param, _ in groups:
        assert torch.equal(ema, param)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_views_take_the_scalar_path(backend):
    """Views at odd element offsets of one buffer per role: contiguous but not 16-byte aligned."""
    buffers = [torch.full((5000,), float("nan")), torch.randn(5000).bfloat16(), torch.randn(5000),
               torch.randn(5000).bfloat16()]
    groups = [tuple(buffer[start:start + length] for buffer in buffers)
              for start, length in ((1, 1001), (1003, 96), (1103, 3000))]
    run_and_check(groups, 0.4, 0.05, backend)
    outside = torch.tensor([0, 1002, 1099, 1100, 1101, 1102, *range(4103, 5000)])
    assert buffers[0][outside].isnan().all()  # the poisoned elements outside the views: untouched


@pytest.mark.skipif(not ON_CPU or "cpu" not in BACKENDS, reason="the CPU kernels' chunking")
@pytest.mark.parametrize("chunk_size", [8, 24])
def test_cpu_chunk_boundaries_everywhere(chunk_size):
    """Chunks of 8 / 24 elements put chunk boundaries and vector tails all over the tensors."""
    from pyalign import _build
    groups = [make_group(size, torch.float16, torch.float32, torch.bfloat16) for size in (5, 8, 9, 100, 257)]
    befores = [group[1].clone() for group in groups]
    _build.load_cpu_ops().multi_tensor_bema_(*map(list, zip(*groups)), 0.3, 0.1, chunk_size)
    for (target, ema, param, init), before in zip(groups, befores, strict=True):
        assert_rounded_from(ema, bema_ema64(before, param, 0.1), (before, param))
        assert_rounded_from(target, bema_weights64(ema, param, init, 0.3),
                            (ema, 0.3 * param.double(), 0.3 * init.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_element(backend):
    groups = [make_group(33, torch.float32, torch.float32, torch.bfloat16)]
    groups[0][2][7] = float("nan")
    emas = groups[0][1].clone()
    pyalign.bema_(*map(list, zip(*groups)), alpha=0.5, beta=0.2, backend=backend)
    target, ema, param, init = groups[0]
    assert torch.isnan(ema[7]) and torch.isnan(target[7])
    others = torch.arange(33) != 7
    assert_rounded_from(ema[others], bema_ema64(emas, param, 0.2)[others], (emas[others], param[others]))
    assert torch.isfinite(target[others]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_does_not_change_results(backend):
    start = [make_group(size, *dtypes) for size, dtypes in
             ((300_001, (torch.float32,) * 3), (70_000, (torch.bfloat16, torch.float32, torch.float16)))]

    def run_once():
        groups = [tuple(t.clone() for t in group) for group in start]
        pyalign.bema_(*map(list, zip(*groups)), alpha=0.7, beta=0.01, backend=backend)
        return [t for group in groups for t in group[:2]]

    same_under_thread_counts(run_once)


def test_float64_and_strided_tensors_run_on_eager():
    """fp64 groups and strided views (mixed into one call with kernel-ready groups) run on the
    eager path; every group gets the formula."""
    base = torch.randn(10, 8)
    strided = (base[:, ::2], torch.randn(10, 4), torch.randn(10, 4), torch.randn(10, 4))
    groups = [make_group(40, torch.float64, torch.float64, torch.float64), strided,
              make_group(17, torch.bfloat16, torch.float32, torch.float32)]
    run_and_check(groups, 0.3, 0.2, "auto")
    assert torch.equal(base[:, ::2], groups[1][0])  # written through the view


def test_aliasing_is_refused_before_any_update():
    ema, param, init = torch.randn(6), torch.randn(6), torch.randn(6)
    first = make_group(5, torch.float32, torch.float32, torch.float32)
    before = [t.clone() for t in first]
    cases = [((param, ema, param, init), r"targets\[1\] overlaps params\[1\]"),
             ((torch.empty(6), ema, param, ema), r"emas\[1\] overlaps inits\[1\]"),
             ((ema, ema, param, init), r"targets\[1\] and emas\[1\] overlap"),
             ((torch.empty(6), ema, ema, init), r"emas\[1\] overlaps params\[1\]")]
    for group, message in cases:
        with pytest.raises(ValueError, match=message):
            pyalign.bema_(*map(list, zip(first, group)), alpha=0.5, beta=0.5)
        assert all(torch.equal(t, b) for t, b in zip(first, before, strict=True) if not t.isnan().any())


def test_bad_input_is_named():
    t, e, p, i = (torch.randn(4) for _ in range(4))
    with pytest.raises(ValueError, match="lists of one length"):
        pyalign.bema_([t], [e], [p, torch.randn(4)], [i], alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match=r"params\[0\]: shape \(3,\)"):
        pyalign.bema_([t], [e], [torch.randn(3)], [i], alpha=0.5, beta=0.5)
    with pytest.raises(TypeError, match=r"emas\[0\] and inits\[0\] must share a dtype"):
        pyalign.bema_([t], [e], [p], [i.bfloat16()], alpha=0.5, beta=0.5)
    with pytest.raises(TypeError, match=r"inits\[0\]: weight ops take floating tensors"):
        pyalign.bema_([t], [e], [p], [torch.ones(4, dtype=torch.int64)], alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match=r"inits\[0\]: shape \(4,\) on meta"):
        pyalign.bema_([t], [e], [p], [torch.empty(4, device="meta")], alpha=0.5, beta=0.5)
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta must be in"):
            pyalign.bema_([t], [e], [p], [i], alpha=0.5, beta=beta)
    with pytest.raises(ValueError, match="alpha must be finite"):
        pyalign.bema_([t], [e], [p], [i], alpha=float("inf"), beta=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        pyalign.bema_([t], [e], [p], [i], alpha=0.5, beta=0.5, backend="fast")
    if "cuda" in backends.BACKENDS and DEVICE.type == "cpu":
        with pytest.raises(backends.BackendUnavailable):
            pyalign.bema_([t], [e], [p], [i], alpha=0.5, beta=0.5, backend="cuda")


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16-ref-fp32-state"])
def test_bench_case_runs_at_toy_size(dtypes):
    """The bench case (pyalign bench --cases bema) builds and runs every row; no timing kept."""
    from pyalign.bench.harness import run_case
    from pyalign.bench.weights import bema_case
    case = bema_case(20_000, DEVICE, num_tensors=8, target_dtype=dtypes[0], state_dtype=dtypes[1],
                     param_dtype=dtypes[2])
    rows = run_case(case, DEVICE, warmup=1, reps=1, measure_memory=False)
    assert {row.name for row in rows} >= {f"pyalign.bema_ [{name}]" for name in BACKENDS}
    assert all(row.status == "ok" for row in rows), [(row.name, row.status) for row in rows]
