"""pyalign/_build.py: lazy registration, build status, and the eager fallback when the
extension is unavailable (PYALIGN_DISABLE_EXT=1, in a fresh subprocess)."""
import json
import os
import subprocess
import sys
import textwrap

from pyalign import _build, backends

FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import pyalign
        from pyalign import _build, backends
        torch.manual_seed(0)
        logits, labels = torch.randn(6, 50), torch.randint(0, 50, (6,))
        first = pyalign.token_logprobs(logits, labels)
        second = pyalign.token_logprobs(logits, labels)
        targets, sources = [torch.randn(9)], [torch.randn(9)]
        expected = 0.9 * targets[0] + 0.1 * sources[0]
        pyalign.ema_(targets, sources, 0.9)
        kl = pyalign.kl_penalty(torch.randn(5), torch.randn(5), estimator="k3")
    try:
        pyalign.token_logprobs(logits, labels, backend="cpu")
        explicit = "ran"
    except backends.BackendUnavailable as exc:
        explicit = str(exc)
    expected_logprobs = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "logprobs_ok": bool(torch.allclose(first.double(), expected_logprobs, atol=1e-5)),
        "repeat_equal": bool(torch.equal(first, second)),
        "ema_ok": bool(torch.allclose(targets[0], expected, atol=1e-6)),
        "kl_finite": bool(torch.isfinite(kl).all()),
        "explicit": explicit,
        "status": _build.build_status(),
    }))
""")


def test_import_is_cheap_and_registers_lazily():
    # nothing compiled at import: the loaders are registered, the libraries are not loaded
    code = ("import pyalign, pyalign._build as b, pyalign.backends as be, json; "
            "print(json.dumps([b.build_status()['cpu_built'], "
            "sorted(f for (f, k) in be._loaders if k == 'cpu'), "
            "sorted(f for (f, k) in be._loaders if k == 'cuda')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    built, cpu_families, cuda_families = json.loads(out.stdout.strip().splitlines()[-1])
    assert built is False
    assert cpu_families == ["kl", "linear_logprobs", "logprobs", "policy", "weights"]
    assert "weights" in cuda_families


def test_build_status_after_build(cpu_ops):
    status = _build.build_status()
    assert status["compiler_found"] and status["ninja_found"] and status["sources_found"]
    assert status["cpu_built"] is True and status["cpu_error"] is None
    assert os.path.isdir(status["cpu_build_dir"])
    assert status["cpu_seconds"] is not None and status["cpu_seconds"] >= 0
    assert backends.status("logprobs", "cpu", "cpu") == (True, "ok")


def test_disabled_extension_falls_back_to_eager_with_one_warning():
    env = dict(os.environ, PYALIGN_DISABLE_EXT="1")
    env.pop("PYALIGN_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["logprobs_ok"] and result["repeat_equal"] and result["ema_ok"] and result["kl_finite"]
    logprob_warnings = [w for w in result["warnings"] if "cpu backend" in w and "logprobs" in w]
    assert len(logprob_warnings) == 1, result["warnings"]
    assert "PYALIGN_DISABLE_EXT" in logprob_warnings[0]
    assert "PYALIGN_DISABLE_EXT" in result["explicit"]
    assert result["status"]["disabled"] is True and result["status"]["cpu_built"] is False
    assert "PYALIGN_DISABLE_EXT" in result["status"]["cpu_error"]


def test_cuda_backend_reports_why_without_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU error path does not apply")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        _build.load_cuda_ops()
    assert _build.build_status()["cuda"]["built"] is False
