"""The built wheel: it carries everything a non-editable install needs (the Triton kernels as
pyalign.kernels, the C++/CUDA sources as pyalign._csrc, built on first use, not at pip time), and
its metadata installs beside the user's stack: lower bounds only (no cap that would make pip
replace their torch or refuse a newer one), no triton on a plain install, and a distribution
name of its own (PyPI's "pyalign" is an unrelated project)."""
import email
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
DISTRIBUTION = "pyalign-lm"
# Operators that put a ceiling on a release: pip would downgrade a newer install or refuse it.
CAPPING = ("<", "<=", "==", "===", "~=")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    # pip builds in the source tree: a stale build/ there would hide a package missing from
    # pyproject, so the wheel is built from a copy without build outputs.
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", ".git", ".venv", "*.egg-info", "__pycache__", "runs", ".*_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (built,) = tmp_path.glob("*.whl")
    return built


def _metadata(wheel: pathlib.Path):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def _requirements(wheel: pathlib.Path) -> list[Requirement]:
    return [Requirement(line) for line in _metadata(wheel).get_all("Requires-Dist")]


def _in_extra(requirement: Requirement) -> bool:
    return requirement.marker is not None and "extra" in str(requirement.marker)


def test_wheel_ships_kernels_and_csrc_and_compiles_nothing(wheel):
    assert wheel.name.startswith("pyalign_lm-"), wheel.name
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # pure Python: no binary built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected_sources = [p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*")
                        if p.suffix in (".cpp", ".h", ".cu")]
    assert expected_sources
    for source in expected_sources:
        assert f"pyalign/_csrc/{source}" in names, source
    for module in (ROOT / "pyalign").rglob("*.py"):      # every subpackage is listed in pyproject
        assert f"pyalign/{module.relative_to(ROOT / 'pyalign').as_posix()}" in names, module
    assert not any(name.endswith(".so") for name in names)


def test_wheel_metadata_caps_nothing_and_names_no_triton_outside_the_test_extra(wheel):
    assert _metadata(wheel)["Name"] == DISTRIBUTION
    requirements = _requirements(wheel)
    by_name = {r.name.lower(): r for r in requirements if not _in_extra(r)}
    assert {"torch", "transformers"} <= set(by_name), sorted(by_name)
    for requirement in requirements:
        caps = [s for s in requirement.specifier if s.operator in CAPPING]
        assert not caps, f"{requirement}: an upper cap ({caps}) makes pip replace or refuse a release"
    for requirement in by_name.values():   # every dependency of an install has its floor
        assert any(s.operator == ">=" for s in requirement.specifier), requirement
    # a CUDA torch brings its own triton; a CPU install needs none
    assert "triton" not in by_name
    tritons = [r for r in requirements if r.name.lower() == "triton"]
    assert tritons and all('extra == "test"' in str(r.marker) for r in tritons), tritons
