"""The C++ build cache is predictable: keyed by what determines the binary, independent of the
checkout path, built once under a lock, announced in one line, and an unusable cache directory is
replaced by the per-user one (or reported in one line), never a traceback.

Every process here is a subprocess (loading two copies of the library into one process would
register the ops twice). The module builds the extension once, into a fresh cache that is also the
per-user fallback cache of TMPDIR=<tmp>, so the later tests only load it.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyalign import _build

NOTICE = "pyalign: building the C++ extension (cpu)"

SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    from pathlib import Path
    warnings.simplefilter("always")
    if os.environ.get("DENY_WRITE"):  # simulate a cache written by another user: nothing writable
        _access = os.access
        os.access = lambda path, mode, **kw: False if mode & os.W_OK else _access(path, mode, **kw)
    import torch
    from pyalign import _build
    if len(sys.argv) > 1:  # another checkout of the same sources
        _build.CSRC = Path(sys.argv[1])
    import pyalign
    with warnings.catch_warnings(record=True) as caught:
        logits, labels = torch.randn(4, 30), torch.randint(0, 30, (4,))
        got = pyalign.token_logprobs(logits, labels)
    want = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    print(json.dumps({
        "ok": bool(torch.allclose(got.double(), want, atol=1e-5)),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "status": _build.build_status(),
    }))
""")


def _run(args=(), timeout=600, **env):
    full_env = dict(os.environ, **env)
    full_env.pop("PYALIGN_BACKEND", None)
    full_env.pop(_build.DISABLE_ENV, None)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the process hung for {timeout} s; stderr: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    result["stderr"] = stderr
    return result


def _libraries(cache: Path) -> dict[str, tuple[int, int]]:
    """{path: (inode, mtime_ns)} of every built library under the cache."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("cpu-*/*.so")}


def _first_builds(root: Path) -> dict:
    """Two checkouts with identical csrc/ start their first build at the same time, in root."""
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    cache = tmpdir / f"pyalign-cache-{os.getuid()}"  # also the per-user fallback of TMPDIR=tmpdir
    checkouts = []
    for name in ("a", "b"):
        shutil.copytree(_build.CSRC, root / name / "csrc")
        checkouts.append(root / name / "csrc")
    env = {"PYALIGN_CACHE_DIR": str(cache), "TMPDIR": str(tmpdir)}
    procs = [_run([checkout], **env) for checkout in checkouts]
    results = [_finish(proc) for proc in procs]
    return dict(root=str(root), tmpdir=str(tmpdir), cache=str(cache),
                checkouts=[str(c) for c in checkouts], env=env, results=results)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The first builds, done once per test run: pytest-xdist workers share the base temp
    directory's parent, and the first worker here builds (about two minutes) while another one
    waits on the lock and reuses its result. Later tests only load from that cache."""
    if _build.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the CPU extension cannot be built here")
    from filelock import FileLock  # a torch dependency

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # common to every worker of this run
    record = shared / "cppcache-first-builds.json"
    with FileLock(str(shared / "cppcache-first-builds.lock")):
        if record.exists():
            state = json.loads(record.read_text())
        else:
            root = shared / "cppcache"
            root.mkdir()
            state = _first_builds(root)
            record.write_text(json.dumps(state))
    cache = Path(state["cache"])
    return SimpleNamespace(root=Path(state["root"]), tmpdir=Path(state["tmpdir"]), cache=cache,
                           checkouts=[Path(c) for c in state["checkouts"]], env=state["env"],
                           results=state["results"], libraries=_libraries(cache))


def test_concurrent_first_builds_compile_once_and_say_so_in_one_line(built):
    assert all(r["ok"] and not r["warnings"] for r in built.results), built.results
    assert len(built.libraries) == 1, built.libraries
    # exactly one process compiled (the other waited on the lock and loaded its library)
    cached = sorted(r["status"]["cpu_cached"] for r in built.results)
    assert cached == [False, True], [r["status"] for r in built.results]
    builder = next(r for r in built.results if not r["status"]["cpu_cached"])
    notices = [line for line in builder["stderr"].splitlines() if line.startswith(NOTICE)]
    assert len(notices) == 1, builder["stderr"]
    assert builder["status"]["cpu_build_dir"] in notices[0] and "minute" in notices[0]
    loader = next(r for r in built.results if r["status"]["cpu_cached"])
    assert NOTICE not in loader["stderr"]


def test_alternating_checkouts_load_from_the_cache(built):
    results, stamps = [], []
    for checkout in built.checkouts * 2:
        results.append(_finish(_run([checkout], **built.env)))
        stamps.append(_libraries(built.cache))
    assert all(r["ok"] for r in results), results
    assert stamps == [built.libraries] * 4  # same inode, same mtime: never rebuilt
    for result in results:
        assert result["status"].get("cpu_cached") is True, result["status"]
        assert "pyalign:" not in result["stderr"], result["stderr"]  # silent when cached
    # build.ninja names the sources the build used: they must not be either checkout's
    (ninja,) = built.cache.glob("cpu-*/build.ninja")
    for checkout in built.checkouts:
        assert str(checkout) not in ninja.read_text()


def test_stale_torch_lock_file_does_not_hang(built):
    # a build killed mid-way leaves torch's `lock` file behind; torch waits on it forever
    (build_dir,) = built.cache.glob("cpu-*/")
    (build_dir / "lock").touch()
    result = _finish(_run([built.checkouts[0]], **built.env), timeout=180)
    assert result["ok"] and result["status"]["cpu_cached"] is True
    assert _libraries(built.cache) == built.libraries


def test_unusable_cache_dir_falls_back_to_the_per_user_cache(built):
    shared = built.root / "shared-cache"
    shared.write_text("a regular file where the shared cache directory should be")
    env = dict(built.env, PYALIGN_CACHE_DIR=str(shared))
    result = _finish(_run([built.checkouts[0]], **env))
    assert result["ok"] and not result["warnings"], result
    assert result["status"]["cpu_error"] is None
    assert result["status"]["cpu_build_dir"].startswith(str(built.cache))  # the per-user cache
    assert result["status"]["cpu_cached"] is True  # the fixture built it there already
    lines = [line for line in result["stderr"].splitlines() if line.startswith("pyalign:")]
    assert len(lines) == 1 and str(shared) in lines[0], result["stderr"]


def test_no_writable_cache_is_one_line_and_runs_eager(built):
    env = dict(built.env, DENY_WRITE="1")
    result = _finish(_run([built.checkouts[0]], **env))
    assert result["ok"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "cannot write" in result["warnings"][0] and "\n" not in result["warnings"][0]
    assert "\n" not in result["status"]["cpu_error"]
    assert result["status"]["cpu_built"] is False and result["status"]["cpu_cached"] is None


def test_build_key_ignores_the_checkout_path_but_not_the_toolchain(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    original = _build.CSRC
    key = _build._build_key(_build._cpu_sources(), ["-O3"])
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build._build_key(_build._cpu_sources(), ["-O3"]) == key
    assert _build._build_key(_build._cpu_sources(), ["-O2"]) != key
    (copy / "common" / "macros.h").write_text((original / "common" / "macros.h").read_text() + "\n")
    assert _build._build_key(_build._cpu_sources(), ["-O3"]) != key
    monkeypatch.setattr(_build, "CSRC", original)
    identity = _build._toolchain_identity("cpu")
    for index in range(len(identity)):  # torch (version, location), python, compiler, cpu
        changed = list(identity)
        changed[index] += " (another)"
        monkeypatch.setattr(_build, "_toolchain_identity", lambda kind, c=tuple(changed): c)
        assert _build._build_key(_build._cpu_sources(), ["-O3"]) != key
    assert any("torch" in part and os.path.dirname(os.path.realpath(_build.torch.__file__)) in part
               for part in identity)
    assert any(str(_build.compiler()) in part for part in identity)
