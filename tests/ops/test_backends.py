"""The backend table (pyalign/backends.py) on the test device: "auto", PYALIGN_BACKEND, a named
backend that cannot run on the device's tensors, and a registered backend whose loader fails (one
warning, then eager)."""
import warnings

import pytest
import torch
from support import DEVICE, ON_CPU, token_logprobs64

import pyalign
from pyalign import backends

# The backend "auto" tries first on the test device, and a backend that cannot run there.
FIRST = backends.AUTO_ORDER[DEVICE.type][0]
OTHER, OTHER_REASON = ("cuda", "needs CUDA tensors") if ON_CPU else ("cpu", "needs CPU tensors")

FAMILIES = list(backends.PRIMITIVES)


@pytest.fixture
def restored_table():
    """Snapshot the backend table and restore it afterwards: tests here register fakes."""
    saved = (dict(backends._loaders), dict(backends._loaded), dict(backends._failures),
             set(backends._warned))
    yield
    for current, original in zip((backends._loaders, backends._loaded, backends._failures,
                                  backends._warned), saved, strict=False):
        current.clear()
        current.update(original)


def logits_and_labels():
    logits = torch.randn(4, 19)
    labels = torch.tensor([0, 18, -100, 5])
    return logits, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_resolves_to_an_available_backend(family, monkeypatch):
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    available = backends.available(family, DEVICE.type)
    assert "eager" in available
    chosen = backends.resolve(family, "auto", DEVICE)
    assert chosen in available
    if ON_CPU:
        assert chosen != "triton"  # the interpreter is never picked by auto
    assert chosen == next(b for b in backends.AUTO_ORDER[DEVICE.type] if b in available)


def test_auto_matches_float64(monkeypatch):
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    logits, labels = logits_and_labels()
    torch.testing.assert_close(pyalign.token_logprobs(logits, labels).double(),
                               token_logprobs64(logits, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_env_eager_forces_eager(family, monkeypatch):
    monkeypatch.setenv("PYALIGN_BACKEND", "eager")
    assert backends.resolve(family, "auto", DEVICE) == "eager"


def test_env_eager_is_what_runs(monkeypatch, restored_table):
    """With PYALIGN_BACKEND=eager, an op on "auto" never touches another backend's loader."""
    monkeypatch.setenv("PYALIGN_BACKEND", "eager")
    called = []

    def spy_loader():
        called.append(True)
        raise RuntimeError("must not be loaded")

    backends.register("logprobs", FIRST, spy_loader)
    logits, labels = logits_and_labels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logprobs = pyalign.token_logprobs(logits, labels)
    assert not called
    torch.testing.assert_close(logprobs.double(), token_logprobs64(logits, labels),
                               rtol=1e-5, atol=1e-6)


def test_env_is_case_and_space_insensitive(monkeypatch):
    monkeypatch.setenv("PYALIGN_BACKEND", " Eager ")
    assert backends.resolve("kl", "auto", DEVICE) == "eager"


def test_env_bogus_raises(monkeypatch):
    monkeypatch.setenv("PYALIGN_BACKEND", "bogus")
    logits, labels = logits_and_labels()
    with pytest.raises(ValueError, match="PYALIGN_BACKEND must be one of .* got 'bogus'"):
        pyalign.token_logprobs(logits, labels)


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("PYALIGN_BACKEND", "bogus")
    logits, labels = logits_and_labels()
    torch.testing.assert_close(pyalign.token_logprobs(logits, labels, backend="eager").double(),
                               token_logprobs64(logits, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_named_unavailable_backend_raises_with_reason(family):
    with pytest.raises(backends.BackendUnavailable,
                       match=f"backend '{OTHER}' cannot run {family} on {DEVICE.type}: .*{OTHER_REASON}"):
        backends.resolve(family, OTHER, DEVICE)


def test_named_unavailable_backend_through_the_ops(monkeypatch):
    logits, labels = logits_and_labels()
    with pytest.raises(backends.BackendUnavailable, match=OTHER_REASON):
        pyalign.token_logprobs(logits, labels, backend=OTHER)
    with pytest.raises(backends.BackendUnavailable, match=OTHER_REASON):
        pyalign.kl_penalty(torch.randn(3), torch.randn(3), backend=OTHER)
    with pytest.raises(backends.BackendUnavailable, match=OTHER_REASON):
        pyalign.ema_([torch.randn(3)], [torch.randn(3)], 0.5, backend=OTHER)
    if not ON_CPU:  # triton runs on CUDA tensors whatever TRITON_INTERPRET says
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        pyalign.token_logprobs(logits, labels, backend="triton")


def test_unknown_backend_name_raises():
    logits, labels = logits_and_labels()
    with pytest.raises(ValueError, match="backend must be one of .* got 'fastest'"):
        pyalign.token_logprobs(logits, labels, backend="fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        backends.register("logprobs", "fastest", lambda: None)
    with pytest.raises(ValueError, match="unknown op family 'softmax'"):
        backends.register("softmax", "eager", lambda: None)


def test_float64_needs_eager():
    logits, labels = logits_and_labels()
    with pytest.raises(ValueError, match="use backend='eager' for torch.float64"):
        pyalign.token_logprobs(logits.double(), labels, backend=FIRST)


def test_failing_loader_warns_once_and_falls_back_to_eager(monkeypatch, restored_table):
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    calls = []

    def failing_loader():
        calls.append(True)
        raise OSError("libpyalign_cpu.so: cannot open shared object file")

    backends.register("logprobs", FIRST, failing_loader)
    backends._warned.discard(("logprobs", FIRST))
    logits, labels = logits_and_labels()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pyalign.token_logprobs(logits, labels)
        second = pyalign.token_logprobs(logits * 2, labels)
        third = pyalign.token_logprobs(logits, labels, entropy=True)[0]
    ours = [w for w in caught if "pyalign" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert ours[0].category is RuntimeWarning
    assert f"{FIRST} backend is unavailable for logprobs" in message
    assert "cannot open shared object file" in message and "using eager" in message
    assert len(calls) == 1, "a failed load is remembered, not retried on every call"
    expected = token_logprobs64(logits, labels)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(third.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.double(), token_logprobs64(logits * 2, labels),
                               rtol=1e-5, atol=1e-6)
    assert backends.status("logprobs", FIRST, DEVICE.type) == (
        False, "OSError: libpyalign_cpu.so: cannot open shared object file")
    with pytest.raises(backends.BackendUnavailable, match="cannot open shared object file"):
        pyalign.token_logprobs(logits, labels, backend=FIRST)


def test_loader_missing_primitives_is_unavailable(restored_table):
    import types
    backends.register("kl", FIRST, lambda: types.SimpleNamespace(forward=lambda *a: None))
    ok, reason = backends.status("kl", FIRST, DEVICE.type)
    assert not ok and "lacks ['backward']" in reason
    assert FIRST not in backends.available("kl", DEVICE.type)


def test_forced_unavailable_backend_warns_once_and_runs(monkeypatch, restored_table):
    """PYALIGN_BACKEND names a backend that cannot run on these tensors: one warning, eager runs."""
    monkeypatch.setenv("PYALIGN_BACKEND", OTHER)
    backends._warned.discard(("kl", OTHER))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kl = pyalign.kl_penalty(torch.full((3,), -1.0), torch.full((3,), -1.5))
    ours = [w for w in caught if "pyalign" in str(w.message)]
    assert len(ours) == 1 and f"{OTHER} backend is unavailable for kl" in str(ours[0].message)
    torch.testing.assert_close(kl, torch.full((3,), 0.5))
