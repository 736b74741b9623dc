"""Fixtures of the study tests: a tiny grid (2 algorithms x 2 knob values x 2 evaluations, one
seed) on a tiny task, and one uninterrupted `pyalign study` run of it shared by the tests that
compare other launchers and resumed runs against it; a user's tiny model, data and rewards."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from study_helpers import TINY_GRID_TOML, run_study_cli, write_user_files  # noqa: E402


@pytest.fixture(scope="session")
def study_env(tmp_path_factory):
    """The environment of study subprocesses: a private task cache."""
    cache = tmp_path_factory.mktemp("study-cache")
    return {**os.environ, "PYALIGN_CACHE_DIR": str(cache)}


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(TINY_GRID_TOML)
    return str(path)


@pytest.fixture(scope="session")
def pool_run(tmp_path_factory, tiny_grid, study_env):
    """The tiny grid run once, uninterrupted, with 2 workers: its output directory."""
    out = str(tmp_path_factory.mktemp("pool") / "study")
    result = run_study_cli(["--grid", tiny_grid, "--out", out, "--workers", "2"], study_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def user_files(tmp_path_factory):
    """A user's model, data and rewards (study_helpers.write_user_files)."""
    return write_user_files(tmp_path_factory.mktemp("user"))


@pytest.fixture
def run_cli():
    return run_study_cli


__all__ = ["subprocess"]
