"""The fused head's two strategies on the triton backend (docs/gpu.md) against float64, and how
``strategy="auto"`` chooses between them: "chunked" (cuBLAS / torch matmuls over vocabulary
slices with the Triton logprobs kernels as epilogue: on CPU its Python runs on CPU tensors with
the epilogue in the interpreter) with per-token upstream gradients, ignored tokens, V not a
multiple of any block, the head options, entropy and metrics, a memory budget; "fused" in its
grouped launch order over several groups; the split head (fused forward, chunked backward); the
rules of pyalign/backends.py's ``_head_plan``; and the measurement, its on-disk cache (write,
read back in a new process, a corrupt or stale file, a forced strategy) with a fake timer, and
``pyalign doctor``'s listing of it.
"""
import argparse
import json

import pytest
import torch

import pyalign
from pyalign import _head_autotune, backends
from pyalign._head_strategy import HeadMode
from support import IGNORE, backends_for, grads64, head_logits64, head_outputs64

pytestmark = pytest.mark.skipif("triton" not in backends_for("linear_logprobs"),
                                reason="the triton backend does not run here")
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def head_case(tokens, hidden_size, vocab, dtype=torch.float32, with_bias=False):
    """Random inputs; the last column labelled once, tokens 1 and 2 ignored."""
    hidden = torch.randn(tokens, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * (2.0 / hidden_size ** 0.5)).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (tokens,))
    labels[0] = vocab - 1
    if tokens > 3:
        labels[1:3] = IGNORE
    return hidden, weight, bias, labels


def score(hidden, weight, bias, labels, grad_logprobs, grad_entropy, outputs=("entropy",),
          **kwargs):
    """(outputs, [d hidden, d weight, d bias]) of sum(lp * g_lp + entropy * g_ent)."""
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = bias.clone().requires_grad_(True) if bias is not None else None
    out = pyalign.linear_token_logprobs(*leaves, labels, bias=bias_leaf, outputs=outputs, **kwargs)
    torch.autograd.backward([out.log_probs, out.entropy], [grad_logprobs, grad_entropy])
    return out, [leaf.grad for leaf in leaves] + ([bias_leaf.grad] if bias is not None else [])


def oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy, softcap=None,
           logit_scale=1.0, temperature=1.0):
    """float64 outputs (dict) and gradients of the same objective, by autograd."""
    inputs = [hidden, weight] + ([bias] if bias is not None else [])

    def differentiable(h, w, b=None):
        out = head_outputs64(head_logits64(h, w, b, softcap, logit_scale, temperature), labels)
        return torch.stack([out["log_probs"], out["entropy"]])

    _, grads = grads64(differentiable, inputs, torch.stack([grad_logprobs, grad_entropy]))
    return head_outputs64(head_logits64(hidden, weight, bias, softcap, logit_scale, temperature),
                          labels), grads


def relative_error(actual, expected):
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


def assert_matches(out, grads, expected, exp_grads, dtype=torch.float32, names=("log_probs",
                                                                              "entropy")):
    """Values to 1e-5 (fp32) or 4e-2 (logits rounded to bf16: 2^-9 of logits up to ~10, over
    a temperature of 0.7), gradients by relative error."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-2)
    for name in names:
        torch.testing.assert_close(getattr(out, name).double(), expected[name], **tol, msg=name)
    limit = 5e-5 if dtype == torch.float32 else 2e-2
    for name, grad, want in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=False):
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        assert relative_error(grad, want) < limit, name


@pytest.fixture
def calls(monkeypatch):
    """Which pieces ran: the fused kernels' forward / backward, the Triton epilogue's."""
    from pyalign.kernels import linear_logprobs as fused
    from pyalign.kernels import logprobs as epilogue
    seen = []

    def spy(real, label):
        def recorded(*args, **kwargs):
            seen.append(label)
            return real(*args, **kwargs)
        return recorded

    for module, name, label in ((fused, "forward", "fused forward"),
                                (fused, "backward", "fused backward"),
                                (epilogue, "forward", "epilogue forward"),
                                (epilogue, "backward_columns", "epilogue backward")):
        monkeypatch.setattr(module, name, spy(getattr(module, name), label))
    return seen


# ------------------------------------------------------------------ strategy "chunked"

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 5], ids=["one-slice", "slices"])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)],
                         ids=["nobias-T1", "bias-T0.7"])
def test_chunked_strategy_matches_float64(calls, dtype, chunk_size, with_bias, temperature):
    """37 tokens (2 ignored), V = 300 (no block divides it): the values and the gradients of
    hidden, weight and bias under per-token upstream gradients of log-probs and entropy, with
    the Triton epilogue between the matmuls (in slices of 5 tokens' worth: 1500 // 37 = 40
    columns, 8 slices)."""
    hidden, weight, bias, labels = head_case(37, 48, 300, dtype, with_bias)
    grad_logprobs, grad_entropy = torch.randn(37), torch.randn(37)
    out, grads = score(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                       backend="triton", strategy="chunked", chunk_size=chunk_size,
                       temperature=temperature)
    assert_matches(out, grads, *oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                       temperature=temperature), dtype=dtype)
    ignored = labels == IGNORE
    assert torch.all(out.log_probs[ignored] == 0) and torch.all(grads[0][ignored] == 0)
    assert "fused forward" not in calls and "fused backward" not in calls
    assert calls.count("epilogue backward") == (1 if chunk_size is None else 8)


@pytest.mark.parametrize("softcap,logit_scale,temperature",
                         [(2.5, 1.0, 1.0), (None, 0.3, 1.0), (2.5, 0.3, 0.7), (30.0, 2.0, 1.3)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_chunked_strategy_head_options_and_outputs_match_float64(softcap, logit_scale,
                                                                 temperature, with_bias):
    hidden, weight, bias, labels = head_case(9, 16, 100, with_bias=with_bias)
    hidden = hidden * 3  # logits of ~10: a softcap of 2.5 saturates
    labels[3] = int((hidden[3] @ weight.t()).argmax())  # a label at its row's maximum: is_top1
    grad_logprobs, grad_entropy = torch.randn(9), torch.randn(9)
    out, grads = score(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                       outputs=ALL_OUTPUTS, softcap=softcap, logit_scale=logit_scale,
                       temperature=temperature, chunk_size=3, backend="triton",
                       strategy="chunked")
    expected, exp_grads = oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                                 softcap, logit_scale, temperature)
    assert_matches(out, grads, expected, exp_grads,
                   names=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"))
    assert torch.equal(out.is_top1, expected["is_top1"]) and bool(out.is_top1[3])


@pytest.mark.parametrize("kept_tokens", [45, 10], ids=["all", "some"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_strategy_memory_budget_matches_float64(kept_tokens, softcap):
    """Kept logits (all or the first 10 tokens, one of them an ignored NaN row) become their own
    gradient in place: the same values and gradients as float64."""
    hidden, weight, bias, labels = head_case(45, 16, 300, with_bias=True)
    labels[5] = IGNORE
    hidden[5] = float("nan")
    grad_logprobs, grad_entropy = torch.randn(45), torch.randn(45)
    out, grads = score(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                       memory_budget=kept_tokens * 300 * 4, chunk_size=7, backend="triton",
                       strategy="chunked", softcap=softcap, logit_scale=0.8, temperature=0.9)
    valid = labels != IGNORE
    expected, exp_grads = oracle(hidden[valid], weight, bias, labels[valid], grad_logprobs[valid],
                                 grad_entropy[valid], softcap, 0.8, 0.9)
    assert torch.all(grads[0][~valid] == 0)
    grads[0] = grads[0][valid]
    assert_matches(out._replace(log_probs=out.log_probs[valid], entropy=out.entropy[valid]),
                   grads, expected, exp_grads)


def test_split_head_runs_the_fused_forward_and_the_chunked_backward(calls):
    """batch_invariant and deterministic together: the fused kernel's forward, the chunked
    backward (no atomics) taking its row stats; the memory budget keeps nothing."""
    hidden, weight, bias, labels = head_case(37, 48, 300, with_bias=True)
    grad_logprobs, grad_entropy = torch.randn(37), torch.randn(37)
    out, grads = score(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                       backend="triton", batch_invariant=True, deterministic=True,
                       memory_budget=1 << 20)
    assert_matches(out, grads, *oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy))
    assert calls == ["fused forward", "epilogue backward"]


# ------------------------------------------------------------------ strategy "fused"

@pytest.mark.parametrize("dtype,tokens,group_rows", [(torch.float32, 150, 2),
                                                     (torch.float32, 150, 8),
                                                     (torch.bfloat16, 300, 2)], ids=str)
def test_fused_backward_in_groups_matches_float64(monkeypatch, calls, dtype, tokens, group_rows):
    """The backward's grouped launch order over 5 (fp32, 32-row tiles) or 3 (bf16, 128-row
    tiles) row blocks and several column blocks, in groups of 2 (the last one short) or 8 (one
    group): every tile runs once."""
    from pyalign.kernels import linear_logprobs as fused
    monkeypatch.setattr(fused, "_group_rows", lambda device: group_rows)
    hidden, weight, bias, labels = head_case(tokens, 40, 300, dtype, True)
    grad_logprobs, grad_entropy = torch.randn(tokens), torch.randn(tokens)
    out, grads = score(hidden, weight, bias, labels, grad_logprobs, grad_entropy,
                       backend="triton", strategy="fused")
    assert_matches(out, grads, *oracle(hidden, weight, bias, labels, grad_logprobs, grad_entropy),
                   dtype=dtype)
    assert calls == ["fused forward", "fused backward"]


# ------------------------------------------------------------------ the choice

@pytest.fixture
def no_measurement(monkeypatch):
    monkeypatch.setattr(backends, "_measures_strategy", lambda device: False)
    monkeypatch.delenv("PYALIGN_HEAD_STRATEGY", raising=False)


@pytest.mark.parametrize("mode,keeps,env,expected", [
    (HeadMode(), False, None, ("fused", "fused")),
    (HeadMode("chunked"), False, None, ("chunked", "chunked")),
    (HeadMode(), True, None, ("chunked", "chunked")),
    (HeadMode(deterministic=True), False, None, ("chunked", "chunked")),
    (HeadMode(batch_invariant=True), False, None, ("fused", "fused")),
    (HeadMode("chunked", batch_invariant=True), False, None, ("fused", "chunked")),
    (HeadMode(deterministic=True, batch_invariant=True), False, None, ("fused", "chunked")),
    (HeadMode(), False, "chunked", ("chunked", "chunked")),
    (HeadMode("fused"), False, "chunked", ("fused", "fused")),  # an argument beats the variable
])
def test_head_plan_rules(no_measurement, monkeypatch, mode, keeps, env, expected):
    if env:
        monkeypatch.setenv("PYALIGN_HEAD_STRATEGY", env)
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    assert backends._head_plan(hidden, weight, mode, keeps) == expected


def test_torch_deterministic_algorithms_ask_for_chunked(no_measurement):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert backends._head_plan(hidden, weight, HeadMode(), False) == ("chunked", "chunked")
        with pytest.raises(RuntimeError, match="strategy 'fused' is not deterministic"):
            backends._head_plan(hidden, weight, HeadMode("fused"), False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            assert backends._head_plan(hidden, weight, HeadMode("fused"), False) == ("fused",) * 2
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def test_chosen_head_strategy_without_measurement(no_measurement):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    assert backends.chosen_head_strategy(hidden, weight, "triton") == "fused"
    for backend in backends_for("linear_logprobs"):
        if backend != "triton":
            assert backends.chosen_head_strategy(hidden, weight, backend) == "chunked"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(strategy="fast"), ValueError, "strategy must be one of"),
    (dict(strategy=None), ValueError, "strategy must be one of"),
    (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
    (dict(batch_invariant=1), TypeError, "batch_invariant must be a bool"),
    (dict(strategy="fused", deterministic=True), ValueError, "strategy='fused' is not determ"),
])
def test_bad_strategy_arguments_are_clear_errors(kwargs, error, match):
    hidden, weight, _, labels = head_case(4, 8, 10)
    with pytest.raises(error, match=match):
        pyalign.linear_token_logprobs(hidden, weight, labels, backend="triton", **kwargs)


def test_a_bad_strategy_variable_and_a_forced_fused_under_determinism_fail_clearly(
        no_measurement, monkeypatch):
    hidden, weight, _, labels = head_case(4, 8, 10)
    monkeypatch.setenv("PYALIGN_HEAD_STRATEGY", "fastest")
    with pytest.raises(ValueError, match="PYALIGN_HEAD_STRATEGY must be one of"):
        pyalign.linear_token_logprobs(hidden, weight, labels, backend="triton")
    monkeypatch.setenv("PYALIGN_HEAD_STRATEGY", "fused")
    with pytest.raises(RuntimeError, match="not deterministic"):
        pyalign.linear_token_logprobs(hidden, weight, labels, backend="triton", deterministic=True)


def test_default_head_chunk_is_large_on_a_gpu_and_bounded_by_memory():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert backends.default_head_chunk(cpu, 128256, 2) is None
    assert backends.default_head_chunk(gpu, 128256, 2) == 4096  # 1 GiB of bf16 logits holds 4185
    assert backends.default_head_chunk(gpu, 262144, 2) == 2048  # capped at 1 GiB
    assert backends.default_head_chunk(gpu, 128256, 4) == 2092


# ------------------------------------------------------------------ measured, and cached

class FakeTimer:
    """Seconds per strategy; records what it was asked to time. ``run_it``: run the closure too
    (the timing inputs must go through both implementations)."""

    def __init__(self, seconds, run_it=False):
        self.seconds, self.run_it, self.timed = seconds, run_it, []

    def __call__(self, name, run):
        self.timed.append(name)
        if self.run_it:
            run()
        value = self.seconds[name]
        if isinstance(value, BaseException):
            raise value
        return value


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """auto measures here (whatever the device), into a cache file of its own, through the fake
    timer ``measured(seconds)`` installs."""
    path = tmp_path / "cache" / "head_strategy.json"
    monkeypatch.setattr(_head_autotune, "cache_path", lambda: path)
    monkeypatch.setattr(backends, "_measures_strategy", lambda device: True)
    monkeypatch.delenv("PYALIGN_HEAD_STRATEGY", raising=False)
    _head_autotune.forget()

    def install(seconds, run_it=False):
        timer = FakeTimer(seconds, run_it)
        monkeypatch.setattr(_head_autotune, "TIMER", timer)
        return timer
    install.path = path
    yield install
    _head_autotune.forget()


def _score(tokens, **kwargs):
    hidden, weight, _, labels = head_case(tokens, 8, 30)
    hidden.requires_grad_(True)
    pyalign.linear_token_logprobs(hidden, weight, labels, backend="triton", **kwargs).sum().backward()
    return hidden, weight


@pytest.mark.parametrize("fast", ["chunked", "fused"])
def test_auto_measures_once_per_bucket_and_runs_the_faster(measured, calls, fast):
    slow = "fused" if fast == "chunked" else "chunked"
    timer = measured({fast: 1e-3, slow: 3e-3}, run_it=True)
    hidden, weight = _score(20)
    assert sorted(timer.timed) == ["chunked", "fused"]
    calls.clear()
    _score(30)  # the same bucket (N <= 32): no timing, the winner runs
    assert sorted(timer.timed) == ["chunked", "fused"]
    assert ("fused forward" in calls) == (fast == "fused")
    assert ("epilogue forward" in calls) == (fast == "chunked")
    assert backends.chosen_head_strategy(hidden, weight, "triton") == fast
    entries = json.loads(measured.path.read_text())
    assert entries["versions"] == _head_autotune.versions()
    (key, entry), = entries["entries"].items()
    assert key == _head_autotune.key(hidden.detach(), weight) and "|N<=32|H=8|V=30" in key
    assert entry["strategy"] == fast and entry["ms"] == {fast: 1.0, slow: 3.0}
    _score(40)  # another bucket: measured again
    assert len(timer.timed) == 4


def test_the_cache_file_outlives_the_process(measured):
    measured({"chunked": 1e-3, "fused": 2e-3})
    _score(20)
    _head_autotune.forget()  # as a new process: only the file remembers
    timer = measured({"chunked": 5e-3, "fused": 1e-3})
    _score(20)
    assert timer.timed == []
    assert "chunked" in "\n".join(_head_autotune.describe())


@pytest.mark.parametrize("content", ["{not json", json.dumps({"entries": [1, 2]}),
                                     json.dumps({"versions": {}, "entries": {"k": {"ms": 1}}})])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(measured, content):
    measured.path.parent.mkdir(parents=True)
    measured.path.write_text(content)
    timer = measured({"chunked": 1e-3, "fused": 2e-3})
    with pytest.warns(RuntimeWarning, match="corrupt head strategy cache"):
        _score(20)
    assert len(timer.timed) == 2
    payload = json.loads(measured.path.read_text())
    assert [entry["strategy"] for entry in payload["entries"].values()] == ["chunked"]


def test_another_versions_entries_are_measured_again(measured):
    measured({"chunked": 1e-3, "fused": 2e-3})
    hidden, weight = _score(20)
    payload = json.loads(measured.path.read_text())
    payload["versions"]["pyalign"] = "0.0.0-other"
    measured.path.write_text(json.dumps(payload))
    _head_autotune.forget()
    timer = measured({"chunked": 3e-3, "fused": 1e-3})
    _score(20)
    assert len(timer.timed) == 2
    assert backends.chosen_head_strategy(hidden, weight, "triton") == "fused"


@pytest.mark.parametrize("forced", ["argument", "variable"])
def test_a_forced_strategy_skips_the_measurement(measured, monkeypatch, calls, forced):
    timer = measured({"chunked": 1e-3, "fused": 2e-3})
    if forced == "variable":
        monkeypatch.setenv("PYALIGN_HEAD_STRATEGY", "fused")
        _score(20)
    else:
        _score(20, strategy="fused")
    assert timer.timed == [] and not measured.path.exists()
    assert calls == ["fused forward", "fused backward"]


def test_a_candidate_out_of_memory_loses(measured):
    timer = measured({"fused": torch.OutOfMemoryError("out of memory"), "chunked": 9.0})
    hidden, weight = _score(20)
    assert sorted(timer.timed) == ["chunked", "fused"]
    assert backends.chosen_head_strategy(hidden, weight, "triton") == "chunked"
    (entry,) = json.loads(measured.path.read_text())["entries"].values()
    assert entry["ms"]["fused"] is None


def test_doctor_lists_the_cache(measured, capsys):
    from pyalign.cli import doctor
    measured({"chunked": 1e-3, "fused": 2e-3})
    hidden, weight = _score(20)
    assert doctor.run_doctor(argparse.Namespace(compile=False)) == 0
    out = capsys.readouterr().out
    assert f"head strategy cache {measured.path}: 1 entry" in out
    assert f"  {_head_autotune.key(hidden.detach(), weight)} -> chunked (chunked 1.0 ms, fused 2.0 ms)" in out
