"""csrc/cpu/weights.cpp (+ csrc/common/multi_tensor.h): in-place multi-tensor ema_/lerp_/copy_
on the CPU backend, through the public API (pyalign.ema_ etc., backend="cpu") and the raw op
(small chunk sizes, to put chunk boundaries everywhere), against float64 oracles."""
import itertools

import pytest
import torch

import pyalign
from oracle import ema64, lerp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [0, 1, 7, 33, 1023, 65537, 200_003]


def expected_after(kind, target, source, scalar):
    if kind == "ema":
        value = ema64(target, source, scalar)
    elif kind == "lerp":
        value = lerp64(target, source, scalar)
    else:
        value = source.double()
    return value.to(target.dtype)  # one rounding into the target dtype


def assert_updated(kind, targets, befores, sources, scalar):
    for i, (target, before, source) in enumerate(zip(targets, befores, sources)):
        expected = expected_after(kind, before, source, scalar)
        # fp32 math then one rounding vs fp64 math then one rounding: at most one ulp apart
        rtol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[target.dtype]
        torch.testing.assert_close(target, expected, rtol=rtol, atol=1e-6,
                                   msg=lambda m: f"tensor {i} ({target.dtype} <- {source.dtype}): {m}")


def run_public(kind, targets, sources, scalar):
    if kind == "ema":
        pyalign.ema_(targets, sources, scalar, backend="cpu")
    elif kind == "lerp":
        pyalign.lerp_(targets, sources, scalar, backend="cpu")
    else:
        pyalign.copy_(targets, sources, backend="cpu")


@pytest.mark.parametrize("kind,scalar", [("ema", 0.9), ("lerp", 0.6), ("copy", 0.0)])
def test_mixed_dtypes_odd_sizes_public_api(cpu_ops, kind, scalar):
    targets, sources = [], []
    for (target_dtype, source_dtype), size in itertools.product(
            itertools.product(DTYPES, DTYPES), ODD_SIZES):
        targets.append(torch.randn(size).to(target_dtype))
        sources.append(torch.randn(size).to(source_dtype))
    befores = [t.clone() for t in targets]
    run_public(kind, targets, sources, scalar)
    assert_updated(kind, targets, befores, sources, scalar)


@pytest.mark.parametrize("kind,scalar", [("ema", 0.995), ("lerp", 0.5), ("copy", 0.0)])
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
    # elements of the storage outside the views are untouched
    for index in (0, 4001, 4002, *range(4100, 5000)):
        assert storage_t[index] == storage_before[index]


def test_thousand_tiny_tensors(cpu_ops):
    targets = [torch.randn(int(n)) for n in torch.randint(1, 20, (1000,))]
    sources = [torch.randn_like(t) for t in targets]
    befores = [t.clone() for t in targets]
    pyalign.ema_(targets, sources, 0.9, backend="cpu")
    assert_updated("ema", targets, befores, sources, 0.9)


def test_aliasing_target_is_source(cpu_ops):
    tensors = [torch.randn(1000), torch.randn(77).bfloat16()]
    befores = [t.clone() for t in tensors]
    pyalign.ema_(tensors, tensors, 0.9, backend="cpu")
    assert_updated("ema", tensors, befores, befores, 0.9)
    pyalign.lerp_(tensors, tensors, 0.3, backend="cpu")
    pyalign.copy_(tensors, tensors, backend="cpu")
    assert_updated("lerp", tensors, befores, befores, 0.3)


def test_modules_and_nan(cpu_ops):
    policy, ema = torch.nn.Linear(13, 7), torch.nn.Linear(13, 7)
    with torch.no_grad():
        policy.weight[2, 3] = float("nan")
    before = [p.detach().clone() for p in ema.parameters()]
    pyalign.ema_(ema, policy, 0.99, backend="cpu")
    assert torch.isnan(ema.weight[2, 3])
    finite = ~torch.isnan(ema.weight)
    expected = ema64(before[0], policy.weight.detach(), 0.99).float()
    torch.testing.assert_close(ema.weight.detach()[finite], expected[finite], rtol=2e-6, atol=1e-7)


def test_thread_count_does_not_change_results(cpu_ops, threads):
    sources = [torch.randn(300_001), torch.randn(5).bfloat16(), torch.randn(70_000)]
    start = [torch.randn(300_001), torch.randn(5), torch.randn(70_000).half()]

    def run():
        targets = [t.clone() for t in start]
        cpu_ops.multi_tensor_apply_("lerp", targets, sources, 0.37, 0)
        return targets

    for a, b in zip(threads(1, run), threads(2, run)):
        assert torch.equal(a, b)


def test_bad_input_raises_clear_errors(cpu_ops):
    with pytest.raises(ValueError, match="differ in length"):
        pyalign.ema_([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.9, backend="cpu")
    with pytest.raises(ValueError, match="shape"):
        pyalign.lerp_([torch.zeros(3)], [torch.zeros(4)], 0.5, backend="cpu")
    with pytest.raises(RuntimeError, match="1 targets but 2 sources"):
        cpu_ops.multi_tensor_apply_("ema", [torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="3 target elements but 4 source"):
        cpu_ops.multi_tensor_apply_("ema", [torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(RuntimeError, match="not contiguous"):
        cpu_ops.multi_tensor_apply_("ema", [torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9)
    with pytest.raises(RuntimeError, match="unsupported dtypes"):
        cpu_ops.multi_tensor_apply_("ema", [torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="kind must be"):
        cpu_ops.multi_tensor_apply_("swap", [torch.zeros(3)], [torch.zeros(3)], 0.9)


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
        launches.append((tensors, list(zip(pairs[0::2], pairs[1::2]))))
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
    expected = [(i, c) for i, n in enumerate(numels) for c in range(-(-n // chunk_size))]
    assert seen == expected


def test_every_fp16_bit_pattern_loads_exactly(cpu_ops):
    """The kernels' vectorizable fp16 -> fp32 load (bit manipulation) on all 65536 patterns:
    normals, subnormals, +-0, +-inf and NaNs."""
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    widened = torch.full((65536,), float("nan"))
    cpu_ops.multi_tensor_apply_("copy", [widened], [halves], 0.0, 0)
    expected = halves.float()
    same = (widened == expected) | (torch.isnan(widened) & torch.isnan(expected))
    assert same.all()
    assert torch.equal(torch.signbit(widened), torch.signbit(expected))
