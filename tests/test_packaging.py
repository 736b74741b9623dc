"""A wheel carries everything a non-editable install needs: the Triton kernels as
pyalign.kernels and the C++/CUDA sources as pyalign._csrc (built on first use, not at pip time)."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_ships_kernels_and_csrc_and_compiles_nothing(tmp_path):
    # pip builds in the source tree: a stale build/ there would hide a package missing from
    # pyproject, so the wheel is built from a copy without build outputs.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", ".git", ".venv", "*.egg-info", "__pycache__", "runs", ".*_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("pyalign-*.whl"))
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
