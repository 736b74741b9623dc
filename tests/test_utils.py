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


class ConfigProblem(ValueError):
    pass


@pytest.mark.parametrize("value", [3, 0, -7])
def test_check_int_takes_ints_in_range_and_returns_them(value):
    import numpy as np
    import torch

    for given in (value, np.int32(value), torch.tensor(value)):
        assert _utils.check_int("n", given, minimum=-7, maximum=3) == value
        assert type(_utils.check_int("n", given)) is int


@pytest.mark.parametrize("value", [True, 1.0, "1", None, [1]])
def test_check_int_refuses_other_types_naming_the_argument(value):
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        _utils.check_int("chunk_size", value)
    with pytest.raises(ConfigProblem, match="key 'steps' must be an int"):
        _utils.check_int("key 'steps'", value, error=ConfigProblem)


def test_check_int_refuses_values_out_of_range_saying_what_is_accepted():
    import torch

    with pytest.raises(ValueError, match=r"tau must be an int >= 1, got 0"):
        _utils.check_int("tau", 0, minimum=1, what="an int >= 1")
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 5\], got 6"):
        _utils.check_int("n", 6, minimum=0, maximum=5)
    with pytest.raises(ConfigProblem, match="got -1"):
        _utils.check_int("steps", -1, minimum=0, error=ConfigProblem)
    with pytest.raises(TypeError, match="0-d integer tensor"):
        _utils.check_int("n", torch.tensor([1, 2]))


def test_available_cores_is_this_process_share():
    assert 1 <= _utils.available_cores() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert _utils.available_cores() == len(os.sched_getaffinity(0))
