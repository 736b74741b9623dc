"""pyalign.ema_ / lerp_ / copy_ (in-place multi-tensor updates) on every backend of the test
device (support.backends_for: eager and the C++ cpu/cuda ones) against float64 formulas: on a
real transformers model (2-layer Llama, tiny hidden size), fp32 targets of bf16 sources, lists of
tensors of awkward sizes and of every dtype pair, a thousand tiny tensors, a target that is its
own source, every fp16 bit pattern, results independent of the thread count; the accuracy of the
ema update at decay up to 0.999999; modules paired by name (registration order, buffers, wrapper
prefixes); aliasing rejected (a target twice, overlapping views); and the errors for mismatched
inputs."""
import itertools

import pytest
import torch
from torch import nn

import pyalign
from support import (
    DEVICE,
    assert_rounded_from,
    backends_for,
    ema64,
    lerp64,
    same_under_thread_counts,
)

BACKENDS = backends_for("weights")
def expected64(kind, target, source, scalar):
    if kind == "ema":
        return ema64(target, source, scalar)
    if kind == "lerp":
        return lerp64(target, source, scalar)
    return source.double()


def apply(kind, targets, sources, scalar, **kwargs):
    if kind == "ema":
        pyalign.ema_(targets, sources, scalar, **kwargs)
    elif kind == "lerp":
        pyalign.lerp_(targets, sources, scalar, **kwargs)
    else:
        pyalign.copy_(targets, sources, **kwargs)


@pytest.fixture(scope="module")
def llama_pair():
    """Two independently initialised 2-layer Llama models: an fp32 one and a bf16 one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config)
    source = LlamaForCausalLM(config)
    with torch.no_grad():  # norms initialise to ones: make every parameter differ between models
        for param in list(target.parameters()) + list(source.parameters()):
            param.add_(torch.randn_like(param) * 0.1)
    # module scope: set up before the function-scoped default-device fixture, so move explicitly
    return target.to(DEVICE), source.to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,scalar", [("ema", 0.995), ("ema", 0.3), ("lerp", 0.6),
                                         ("lerp", 1.0), ("copy", None)])
def test_llama_model_fp32_target_bf16_source(llama_pair, backend, kind, scalar):
    target_model, source_model = llama_pair
    target = type(target_model)(target_model.config)
    target.load_state_dict(target_model.state_dict())
    before = {name: p.detach().clone() for name, p in target.named_parameters()}
    sources = dict(source_model.named_parameters())
    apply(kind, target, source_model, scalar, backend=backend)
    assert len(before) == 21
    for name, param in target.named_parameters():
        assert param.dtype == torch.float32 and param.requires_grad
        exact = expected64(kind, before[name], sources[name].detach(), scalar)
        assert_rounded_from(param.detach(), exact, (before[name], sources[name].detach()), name)
    for _, param in source_model.named_parameters():  # sources are read only
        assert param.dtype == torch.bfloat16
    assert torch.equal(source_model.state_dict()["lm_head.weight"],
                       llama_pair[1].state_dict()["lm_head.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_lists_and_no_autograd(llama_pair, backend):
    """Lists of nn.Parameter that require grad are updated in place without autograd errors,
    and the result of two chained updates matches the formulas."""
    target_model, source_model = llama_pair
    targets = [p.detach().clone().requires_grad_(True) for p in target_model.parameters()]
    targets = [nn.Parameter(t) for t in targets]
    sources = list(source_model.parameters())
    start = [t.detach().double() for t in targets]
    pyalign.ema_(targets, sources, 0.9, backend=backend)
    pyalign.lerp_(targets, sources, 0.25, backend=backend)
    for target, initial, source in zip(targets, start, sources, strict=False):
        assert target.grad_fn is None and target.requires_grad
        exact = lerp64(ema64(initial, source.detach(), 0.9), source.detach(), 0.25)
        assert_rounded_from(target.detach(), exact, (initial, source.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,scalar", [("ema", 0.99), ("lerp", 0.37), ("copy", None)])
@pytest.mark.parametrize("target_dtype,source_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float32, torch.float16)],
    ids=lambda d: str(d).replace("torch.", ""))
def test_tensor_lists_of_awkward_sizes(backend, kind, scalar, target_dtype, source_dtype):
    shapes = [(1,), (0,), (7, 3), (100003,), (2, 1, 5), ()]
    targets = [torch.randn(shape).to(target_dtype) for shape in shapes]
    sources = [torch.randn(shape).to(source_dtype) for shape in shapes]
    start = [t.double() for t in targets]
    source_copies = [s.clone() for s in sources]
    apply(kind, targets, sources, scalar, backend=backend)
    for target, initial, source, shape in zip(targets, start, sources, shapes, strict=False):
        assert target.dtype == target_dtype and target.shape == shape
        assert_rounded_from(target, expected64(kind, initial, source, scalar), (initial, source),
                            str(shape))
    assert all(torch.equal(s, c) for s, c in zip(sources, source_copies, strict=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay,expected_from", [(1.0, "target"), (0.0, "source")])
def test_ema_endpoints(backend, decay, expected_from):
    targets = [torch.randn(33), torch.randn(4, 4)]
    sources = [torch.randn(33), torch.randn(4, 4)]
    expected = [t.clone() for t in (targets if expected_from == "target" else sources)]
    pyalign.ema_(targets, sources, decay, backend=backend)
    assert all(torch.equal(t, e) for t, e in zip(targets, expected, strict=False))


def test_non_contiguous_and_float64_run_on_eager():
    base = torch.randn(10, 8, dtype=torch.float64)
    target = base[:, ::2]  # a strided view: updated through the view
    source = torch.randn(10, 4, dtype=torch.float64)
    exact = lerp64(target, source, 0.4)
    pyalign.lerp_([target], [source], 0.4)
    torch.testing.assert_close(base[:, ::2], exact, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_include_buffers(backend):
    """Buffers (BatchNorm running statistics) move with include_buffers=True; the integer
    num_batches_tracked is left alone."""
    target, source = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        for module in (target, source):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.weight.normal_()
    source.num_batches_tracked.fill_(5)
    mean_before = target.running_mean.clone()
    pyalign.ema_(target, source, 0.5, backend=backend)
    assert torch.equal(target.running_mean, mean_before)  # parameters only by default
    pyalign.ema_(target, source, 0.5, include_buffers=True, backend=backend)
    assert_rounded_from(target.running_mean, ema64(mean_before, source.running_mean, 0.5),
                        (mean_before, source.running_mean))
    assert target.num_batches_tracked == 0
    pyalign.copy_(target, source, include_buffers=True, backend=backend)
    assert torch.equal(target.running_var, source.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_element_only(backend):
    targets = [torch.randn(9)]
    sources = [torch.randn(9)]
    sources[0][4] = float("nan")
    start = targets[0].double()
    pyalign.ema_(targets, sources, 0.9, backend=backend)
    assert torch.isnan(targets[0][4])
    others = torch.arange(9) != 4
    assert_rounded_from(targets[0][others], ema64(start, sources[0], 0.9)[others],
                        (start[others], sources[0][others]))


@pytest.mark.parametrize("kind", ["ema", "lerp", "copy"])
def test_errors(kind):
    scalar = 0.5
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        apply(kind, [torch.zeros(3), torch.zeros(2)], [torch.zeros(3)], scalar)
    with pytest.raises(ValueError, match=r"tensor 1: target shape \(2,\) != source shape \(3,\)"):
        apply(kind, [torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(3)], scalar)
    with pytest.raises(ValueError, match=f"target on {DEVICE.type}(:0)?, source on meta"):
        apply(kind, [torch.zeros(3)], [torch.zeros(3, device="meta")], scalar)
    with pytest.raises(TypeError, match=r"sources\[1\] is a float, not a tensor"):
        apply(kind, [torch.zeros(3), torch.zeros(1)], [torch.zeros(3), 1.0], scalar)
    with pytest.raises(TypeError, match="targets must be an nn.Module or a list of tensors"):
        apply(kind, 3, [torch.zeros(3)], scalar)
    with pytest.raises(TypeError, match="weight ops take floating tensors"):
        apply(kind, [torch.zeros(3, dtype=torch.int64)], [torch.zeros(3)], scalar)
    with pytest.raises(ValueError, match="differ in length"):
        apply(kind, nn.Linear(3, 2), nn.Linear(3, 2, bias=False), scalar)


def test_scalar_range_errors():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay must be in"):
            pyalign.ema_([torch.zeros(2)], [torch.zeros(2)], bad)
        with pytest.raises(ValueError, match="weight must be in"):
            pyalign.lerp_([torch.zeros(2)], [torch.zeros(2)], bad)


def test_errors_leave_targets_untouched():
    """Validation runs before any update: a bad pair at the end leaves the first one as it was."""
    first = torch.randn(5)
    before = first.clone()
    with pytest.raises(ValueError):
        pyalign.lerp_([first, torch.zeros(2)], [torch.randn(5), torch.zeros(3)], 0.5)
    assert torch.equal(first, before)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [0, 1, 7, 33, 1023, 65537, 200_003]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,scalar", [("ema", 0.9), ("lerp", 0.6), ("copy", None)])
def test_every_dtype_pair_at_odd_sizes_in_one_call(backend, kind, scalar):
    targets, sources = [], []
    for (target_dtype, source_dtype), size in itertools.product(
            itertools.product(DTYPES, DTYPES), ODD_SIZES):
        targets.append(torch.randn(size).to(target_dtype))
        sources.append(torch.randn(size).to(source_dtype))
    start = [t.double() for t in targets]
    apply(kind, targets, sources, scalar, backend=backend)
    for target, initial, source in zip(targets, start, sources, strict=False):
        assert_rounded_from(target, expected64(kind, initial, source, scalar), (initial, source),
                            f"{source.dtype} -> {target.dtype} [{target.numel()}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_thousand_tiny_tensors(backend):
    targets = [torch.randn(int(n)) for n in torch.randint(1, 20, (1000,))]
    sources = [torch.randn_like(t) for t in targets]
    start = [t.double() for t in targets]
    pyalign.ema_(targets, sources, 0.9, backend=backend)
    for target, initial, source in zip(targets, start, sources, strict=False):
        assert_rounded_from(target, ema64(initial, source, 0.9), (initial, source))


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_is_its_own_source(backend):
    tensors = [torch.randn(1000), torch.randn(77).bfloat16()]
    before = [t.clone() for t in tensors]
    pyalign.ema_(tensors, tensors, 0.9, backend=backend)
    pyalign.lerp_(tensors, tensors, 0.3, backend=backend)
    pyalign.copy_(tensors, tensors, backend=backend)
    for tensor, initial in zip(tensors, before, strict=False):  # t = 0.9 t + 0.1 t: one rounding at most
        assert_rounded_from(tensor, initial.double(), (initial, initial))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_fp16_bit_pattern_widens_exactly(backend):
    """copy_ from fp16 into fp32 on all 65536 patterns: normals, subnormals, +-0, +-inf, NaNs."""
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    widened = torch.full((65536,), float("nan"))
    pyalign.copy_([widened], [halves], backend=backend)
    expected = halves.float()
    same = (widened == expected) | (torch.isnan(widened) & torch.isnan(expected))
    assert same.all()
    assert torch.equal(torch.signbit(widened), torch.signbit(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_does_not_change_results(backend):
    sources = [torch.randn(300_001), torch.randn(5).bfloat16(), torch.randn(70_000)]
    start = [torch.randn(300_001), torch.randn(5), torch.randn(70_000).half()]

    def run_once():
        targets = [t.clone() for t in start]
        pyalign.lerp_(targets, sources, 0.37, backend=backend)
        return targets

    same_under_thread_counts(run_once)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_with_a_nan_parameter(backend):
    policy, ema = torch.nn.Linear(13, 7), torch.nn.Linear(13, 7)
    with torch.no_grad():
        policy.weight[2, 3] = float("nan")
    before = [p.detach().clone() for p in ema.parameters()]
    pyalign.ema_(ema, policy, 0.99, backend=backend)
    assert torch.isnan(ema.weight[2, 3])
    finite = ~torch.isnan(ema.weight)
    expected = ema64(before[0], policy.weight.detach(), 0.99).float()
    torch.testing.assert_close(ema.weight.detach()[finite], expected[finite], rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------ ema_ accuracy at high decay

def update_scale_error(before, after, exact_after):
    """Relative error of the update (after - before) against the float64 update, by the
    least-squares scale: sum(got * exact) / sum(exact^2) - 1. The rounding of each element into
    fp32 (up to half an ulp of t, more than the whole update at decay 0.999999) is unbiased and
    averages out over many elements; a systematic error of the update, such as rounding decay
    itself to fp32 (1 - float32(0.999999) is 1.3% off 1e-6), does not."""
    got = after.double() - before.double()
    exact = exact_after - before.double()
    return abs(float((got * exact).sum() / (exact * exact).sum()) - 1.0)


HIGH_DECAYS = [0.99, 0.9999, 0.99999, 0.999999]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", HIGH_DECAYS)
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_update_keeps_fp32_accuracy_at_high_decay(backend, decay, source_dtype):
    """fp32 targets: t_new - t_old matches the float64 update (1 - decay)(s - t) to 1e-4
    relative, at every decay. Measured: ~1e-6 (0.99) to ~3e-5 (0.999999, the per-element
    rounding noise over 2^19 elements); the form decay*t + (1-decay)*s with decay in fp32 is
    1.4e-3 off at 0.99999 and 1.3e-2 at 0.999999."""
    torch.manual_seed(1)
    targets = [torch.randn(1 << 18), torch.randn(300_001) * 3, torch.randn(7, 4097)]
    sources = [(t + torch.randn(t.shape)).to(source_dtype) for t in targets]
    before = [t.clone() for t in targets]
    pyalign.ema_(targets, sources, decay, backend=backend)
    after = torch.cat([t.reshape(-1) for t in targets])
    start = torch.cat([t.reshape(-1) for t in before])
    source = torch.cat([s.reshape(-1) for s in sources])
    exact = ema64(start, source, decay)
    assert update_scale_error(start, after, exact) < 1e-4
    # and still one rounding from the exact value, element by element
    assert_rounded_from(after, exact, (start, source))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", HIGH_DECAYS)
@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ema_low_precision_targets_round_the_exact_value(backend, decay, target_dtype):
    """bf16/fp16 targets (fp32 math): the result is the float64 value rounded to nearest into
    the target dtype (an update below half an ulp leaves t as it is), except where fp32 error
    meets a rounding midpoint: at most 1 in 10^4 elements, and those by one ulp."""
    torch.manual_seed(2)
    targets = [torch.randn(1 << 17).to(target_dtype)]
    sources = [targets[0].float() + torch.randn(1 << 17)]
    start = targets[0].clone()
    pyalign.ema_(targets, sources, decay, backend=backend)
    exact = ema64(start, sources[0], decay)
    expected = exact.to(target_dtype)
    mismatched = targets[0] != expected
    assert int(mismatched.sum()) <= targets[0].numel() // 10_000
    assert_rounded_from(targets[0], exact, (start, sources[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", [1e-2, 1e-4, 1e-5, 1e-6])
def test_lerp_update_keeps_fp32_accuracy_at_small_weights(backend, weight):
    """lerp_ with weight = 1 - decay is the same update: t + w (s - t), accurate to 1e-4."""
    torch.manual_seed(3)
    targets = [torch.randn(1 << 19)]
    sources = [targets[0] + torch.randn(1 << 19)]
    start = targets[0].clone()
    pyalign.lerp_(targets, sources, weight, backend=backend)
    assert update_scale_error(start, targets[0], lerp64(start, sources[0], weight)) < 1e-4


# ------------------------------------------------------------------ aliasing among the tensors
# Rule: no target may share a byte with another target, nor with the source of another pair,
# nor with its own source unless it *is* that source (the same tensor: ema/lerp/copy of t with
# itself is t, a no-op that stays allowed). Checked before any update; the error names indices
# (and parameter names for modules).

@pytest.mark.parametrize("kind", ["ema", "lerp", "copy"])
def test_the_same_target_twice_is_rejected_before_any_update(kind):
    shared, other = torch.randn(50), torch.randn(3)
    before = (shared.clone(), other.clone())
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[2\] overlap in memory"):
        apply(kind, [shared, other, shared], [torch.randn(50), torch.randn(3), torch.randn(50)], 0.9)
    assert torch.equal(shared, before[0]) and torch.equal(other, before[1])


@pytest.mark.parametrize("kind", ["ema", "lerp", "copy"])
def test_overlapping_views_are_rejected(kind):
    buffer = torch.randn(100)
    before = buffer.clone()
    # two targets sharing elements [40, 60) of one buffer
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[1\] overlap in memory"):
        apply(kind, [buffer[:60], buffer[40:]], [torch.randn(60), torch.randn(60)], 0.9)
    # a target that overlaps another pair's source
    with pytest.raises(ValueError, match=r"targets\[1\] overlaps sources\[0\]"):
        apply(kind, [torch.randn(50), buffer[:50]], [buffer[25:75], torch.randn(50)], 0.9)
    # a target overlapping its own source, shifted by one element (order-dependent results)
    with pytest.raises(ValueError, match=r"targets\[0\] overlaps sources\[0\]"):
        apply(kind, [buffer[:50]], [buffer[1:51]], 0.9)
    # the same bytes seen through another dtype
    with pytest.raises(ValueError, match=r"targets\[0\] overlaps sources\[0\]"):
        apply(kind, [buffer[:10]], [buffer[:5].view(torch.bfloat16)], 0.9)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_are_fine(backend):
    """Flat-buffer layouts (one allocation, a view per parameter) keep working, and so do
    interleaved strided views: only shared elements count."""
    buffer, source_buffer = torch.randn(200), torch.randn(200)
    targets = [buffer[:50], buffer[50:120].view(7, 10), buffer[120:]]
    sources = [source_buffer[:50], source_buffer[50:120].view(7, 10), source_buffer[120:]]
    start = [t.double() for t in targets]
    pyalign.ema_(targets, sources, 0.9, backend=backend)
    for target, initial, source in zip(targets, start, sources, strict=True):
        assert_rounded_from(target, ema64(initial, source, 0.9), (initial, source))
    # a target may read a disjoint view of another target's buffer as its source
    pyalign.copy_([buffer[:50]], [buffer[150:]], backend=backend)
    assert torch.equal(buffer[:50], buffer[150:])
    grid = torch.randn(6, 8)
    even, odd = grid[:, ::2], grid[:, 1::2]  # byte ranges interleave, no element is shared
    other = torch.randn(6, 4)
    exact_even, exact_odd = lerp64(even, other, 0.25), lerp64(odd, other, 0.5)
    # strided tensors run on eager whatever the backend ("auto" picks it; "cpu" would refuse)
    pyalign.lerp_([even], [other], 0.25)
    pyalign.lerp_([odd], [other], 0.5)
    pyalign.ema_([even, odd], [other, other], 1.0)  # both at once: no error
    with pytest.raises(ValueError, match=r"targets\[1\] overlaps sources\[0\]"):
        pyalign.ema_([even, odd], [grid[:, 1:5], other], 0.5)  # a source across both
    assert_rounded_from(grid[:, ::2], exact_even, (exact_even, other))
    assert_rounded_from(grid[:, 1::2], exact_odd, (exact_odd, other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_aliasing_names_the_parameters(backend):
    shared = torch.randn(3, 4)
    model = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
    model["a"].weight = nn.Parameter(shared)
    model["b"].weight = nn.Parameter(shared[:, :])  # another Parameter over the same bytes
    source = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
    with pytest.raises(ValueError, match=r"targets\[0\] \('a.weight'\) and targets\[2\] "
                                         r"\('b.weight'\) overlap in memory"):
        pyalign.copy_(model, source, backend=backend)
    # a module that is its own source: every target is its own source, a no-op
    before = {name: p.detach().clone() for name, p in source.named_parameters()}
    pyalign.ema_(source, source, 0.9, backend=backend)
    for name, param in source.named_parameters():
        assert_rounded_from(param.detach(), before[name].double(), (before[name], before[name]))


# ------------------------------------------------------------------ modules pair by name

class Forward(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 4)
        self.decoder = nn.Linear(4, 5)
        self.register_buffer("scale", torch.randn(4))


class Backward(nn.Module):
    """Forward's parameters and buffer, registered in the other order: same names, same shapes
    where it matters (encoder.bias and decoder.bias differ; encoder.weight is [4, 5] and
    decoder.weight [5, 4]: a positional pairing errs on shapes here, see the next class)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.randn(4))
        self.decoder = nn.Linear(4, 5)
        self.encoder = nn.Linear(5, 4)


class Square(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        setattr(self, first, nn.Linear(4, 4))
        setattr(self, second, nn.Linear(4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,scalar", [("ema", 0.9), ("lerp", 0.3), ("copy", None)])
def test_modules_pair_by_name_not_registration_order(backend, kind, scalar):
    """Same shapes everywhere, so a positional pairing would run silently and mix the layers."""
    torch.manual_seed(4)
    target, source = Square("q", "k"), Square("k", "q")  # k registered first in the source
    for module in (target, source):
        for param in module.parameters():
            param.data.normal_()
    before = {name: p.detach().double() for name, p in target.named_parameters()}
    sources = {name: p.detach() for name, p in source.named_parameters()}
    apply(kind, target, source, scalar, backend=backend)
    for name, param in target.named_parameters():
        exact = expected64(kind, before[name], sources[name], scalar)
        assert_rounded_from(param.detach(), exact, (before[name], sources[name]), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_pair_by_name_too(backend):
    target, source = Forward(), Backward()
    before = {name: t.detach().double() for name, t in target.state_dict().items()}
    pyalign.ema_(target, source, 0.75, include_buffers=True, backend=backend)
    source_state = source.state_dict()
    for name, tensor in target.state_dict().items():
        exact = ema64(before[name], source_state[name], 0.75)
        assert_rounded_from(tensor, exact, (before[name], source_state[name]), name)


def test_renamed_parameters_raise_with_the_names():
    with pytest.raises(ValueError, match=r"missing from sources: \['q.bias', 'q.weight'\]; "
                                         r"missing from targets: \['v.bias', 'v.weight'\]"):
        pyalign.ema_(Square("q", "k"), Square("v", "k"), 0.9)
    encoder_only = Forward()
    del encoder_only.decoder, encoder_only.scale
    with pytest.raises(ValueError, match=r"missing from targets: \['decoder.bias', "
                                         r"'decoder.weight', 'scale'\]"):
        pyalign.copy_(encoder_only, Forward(), include_buffers=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapper_prefixes_still_pair(backend):
    """DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes name the same weights."""

    class DDPLike(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    inner, source = Square("q", "k"), Square("k", "q")
    wrapped = DDPLike(inner)
    before = {name: p.detach().double() for name, p in inner.named_parameters()}
    sources = {name: p.detach() for name, p in source.named_parameters()}
    pyalign.lerp_(wrapped, source, 0.5, backend=backend)
    for name, param in inner.named_parameters():
        exact = lerp64(before[name], sources[name], 0.5)
        assert_rounded_from(param.detach(), exact, (before[name], sources[name]), name)
    compiled_like = nn.Module()
    compiled_like._orig_mod = Square("k", "q")
    pyalign.copy_(compiled_like, wrapped, backend=backend)
    for name, param in compiled_like._orig_mod.named_parameters():
        assert torch.equal(param, dict(inner.named_parameters())[name])


def test_a_module_against_a_list_stays_positional():
    module = nn.Linear(3, 2)
    tensors = [torch.randn(2, 3), torch.randn(2)]
    pyalign.copy_(module, tensors)
    assert torch.equal(module.weight, tensors[0]) and torch.equal(module.bias, tensors[1])
