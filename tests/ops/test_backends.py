"""The backend table (pyalign/backends.py) on the test device: "auto", PYALIGN_BACKEND, a named
backend that cannot run on the device's tensors, and a registered backend whose loader fails (one
warning, then eager)."""
import sys
import warnings

import pytest
import torch

import pyalign
from pyalign import backends
from support import DEVICE, ON_CPU, token_logprobs64

# The backend "auto" tries first on the test device, and a backend that cannot run there.
FIRST = backends.AUTO_ORDER[DEVICE.type][0]
OTHER, OTHER_REASON = ("cuda", "needs CUDA tensors") if ON_CPU else ("cpu", "needs CPU tensors")

FAMILIES = list(backends.families())


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cpu unavailable for kl, using eager" (once per family)
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


def test_table_derives_names_choices_and_auto_order():
    assert backends.BACKENDS == tuple(b.name for b in backends.TABLE)
    assert backends.CHOICES == ("auto", *backends.BACKENDS)
    assert backends.AUTO_ORDER == {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")}
    assert set(backends.OPTIONAL_MODULES) == {"pyalign._triton_backend", "pyalign._cpp_backend"}


@pytest.fixture
def import_reports(monkeypatch):
    """A fresh record of which backend modules already warned about a failed import."""
    monkeypatch.setattr(backends, "_import_warned", set())


def test_missing_backend_module_is_silently_absent(restored_table, import_reports):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends._register_optional("pyalign_no_such_backend_module", ("cpu",))
    assert not any("pyalign_no_such_backend_module" in reason
                   for reason in backends._failures.values())


def test_backend_module_failing_to_import_is_reported(tmp_path, monkeypatch, restored_table,
                                                      import_reports):
    """An ImportError of another module inside a backend module: one warning naming the module
    and the error, and that reason in status() for every family of the backend."""
    (tmp_path / "pyalign_broken_backend.py").write_text("import pyalign_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyalign_broken_backend", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends._register_optional("pyalign_broken_backend", ("cpu",))
        backends._register_optional("pyalign_broken_backend", ("cpu",))
    ours = [w for w in caught if "pyalign_broken_backend" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning
    assert "pyalign_missing_dependency" in str(ours[0].message)
    for family in FAMILIES:
        ok, reason = backends.status(family, "cpu", "cpu")
        assert not ok
        assert "importing pyalign_broken_backend failed: ModuleNotFoundError" in reason
        assert "pyalign_missing_dependency" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cpu unavailable for kl, using eager" (once per family)
        assert backends.resolve("kl", "auto", "cpu") == "eager"


def test_backend_module_raising_other_errors_is_reported(restored_table, import_reports,
                                                         monkeypatch):
    class BrokenFinder:
        """Makes importing one module name raise a plain ImportError (not a missing module)."""

        def find_spec(self, name, path=None, target=None):
            if name == "pyalign_raising_backend":
                raise ImportError("cannot import name 'thing' from 'somewhere'")
            return None

    monkeypatch.setattr(sys, "meta_path", [BrokenFinder(), *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="pyalign_raising_backend.*cannot import name 'thing'"):
        backends._register_optional("pyalign_raising_backend", ("triton",))
    ok, reason = backends.status("logprobs", "triton", "cuda")
    assert not ok and "cannot import name 'thing'" in reason
