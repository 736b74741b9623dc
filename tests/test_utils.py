"""pyalign/_utils.py: the atomic file writer every pyalign writer uses (checkpoints, metrics,
plots, benchmark results, the task cache marker)."""
import os
import stat

import pytest

from pyalign import _utils


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_writes_the_bytes_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    _utils.atomic_write(target, "hello\n")
    _utils.atomic_write(target, b"\x00\x01 binary")
    assert target.read_bytes() == b"\x00\x01 binary"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_new_file_gets_the_mode_open_would_give(tmp_path):
    """mkstemp's 0600 must not leak into the user's metrics and plots."""
    umask = os.umask(0o022)
    try:
        _utils.atomic_write(tmp_path / "new.txt", "x")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "new.txt") == _mode(tmp_path / "plain.txt") == 0o644


def test_an_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    _utils.atomic_write(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(_utils.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _utils.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
