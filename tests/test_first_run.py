"""A first run builds the C++ extension and the embedded task before its progress bar starts, each
build with a line saying what it builds, why and for how long at most, then one saying how long it
took (pyalign/_build.py, pyalign/_prepare.py); `pyalign train` does so before its trainer runs a
step, so no step's time includes a build."""
import json
import re
import time

import pytest
from trainers.trainer_helpers import TINY_TASK, write_config

from pyalign import _build, _prepare, backends


def _fresh_cpu_status(monkeypatch):
    monkeypatch.setitem(_build._status, "cpu", {"built": False, "cached": None, "error": None,
                                                "build_dir": None, "seconds": None})


def test_a_first_build_of_the_extension_says_what_why_how_long_and_then_how_long_it_took(
        tmp_path, monkeypatch, capfd):
    """The compiler is stood in for (a real build is tests/toolchain's): it writes the library
    where torch would, after a pause, unless it is there."""
    from torch.utils import cpp_extension

    if _build.compiler() is None or not cpp_extension.is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja, as the extension does")
    monkeypatch.setenv("PYALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(_build.DISABLE_ENV, raising=False)

    def compile_stand_in(name, sources, build_directory, **kwargs):
        library = tmp_path / build_directory / f"{name}.so"
        if not library.exists():  # as ninja: nothing to do when the library is up to date
            time.sleep(1.2)
            library.write_bytes(b"")
    monkeypatch.setattr(cpp_extension, "load", compile_stand_in)

    _fresh_cpu_status(monkeypatch)
    _build._build("cpu", _build._cpu_sources(), extra_cflags=["-O0"])
    start, done = capfd.readouterr().err.strip().splitlines()
    build_dir = _build._status["cpu"]["build_dir"]
    assert start.startswith("pyalign: building the C++ extension (cpu): ") and build_dir in start
    assert _build.PURPOSE["cpu"] in start and "no build of these sources" in start  # what, why
    assert "at most" in start                                                   # how long at most
    seconds = float(re.fullmatch(r"pyalign: built the C\+\+ extension \(cpu\) in (\d+) s; later "
                                 r"runs load it from the cache", done).group(1))
    assert 1 <= seconds == round(_build._status["cpu"]["seconds"])             # how long it took

    _fresh_cpu_status(monkeypatch)                   # a later process: loads it, says nothing
    _build._build("cpu", _build._cpu_sources(), extra_cflags=["-O0"])
    assert capfd.readouterr().err == "" and _build._status["cpu"]["cached"]


def test_a_first_build_of_the_task_says_what_why_how_long_and_then_how_long_it_took(tmp_path, capfd):
    _prepare.prepare_task(3, TINY_TASK, tmp_path, progress=False)
    start, done = capfd.readouterr().err.strip().splitlines()
    assert start.startswith("pyalign: building the embedded task (seed 3): ") and str(tmp_path) in start
    assert "SFT model" in start and "no copy of it is cached" in start and _prepare.TASK_BUILD_TIME in start
    assert re.fullmatch(r"pyalign: built the embedded task in \d+ s", done), done
    _prepare.prepare_task(3, TINY_TASK, tmp_path, progress=False)               # cached: silent
    assert capfd.readouterr().err == ""


def test_train_builds_before_its_trainer_starts(tmp_path, monkeypatch, task_cache_dir):
    """`pyalign train` loads the extension (each backend resolved afresh, as in a new process)
    before it builds the trainer, whose construction already scores the data with the ops and
    whose progress bar and step clock follow."""
    from pyalign.cli.train import main
    from pyalign.trainers import PreferenceTrainer

    events = []
    real_build, real_init = _build._build, PreferenceTrainer.__init__

    def build(kind, *args, **kwargs):
        real_build(kind, *args, **kwargs)
        events.append("extension")

    def init(self, *args, **kwargs):
        events.append("trainer")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(_build, "_build", build)
    monkeypatch.setattr(PreferenceTrainer, "__init__", init)
    monkeypatch.setattr(backends, "_loaded", {})     # nothing loaded yet: a first run's table
    monkeypatch.setattr(backends, "_failures", {})
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    config = write_config(tmp_path / "run.toml", task_cache_dir, batch_size=4, micro_batch_size=2,
                          eval_every=0, final_eval_batch_size=2)
    out = tmp_path / "run"
    assert main(["--algo", "dpo", "--steps", "1", "--config", config, "--out", str(out),
                 "--no-progress"]) == 0
    assert events[0] == "extension" and "trainer" in events, events
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"step_time_s"' in line]
    assert step["step"] == 1 and step["step_time_s"] > 0
