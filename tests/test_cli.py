"""`pyalign doctor` runs in a fresh process and reports every op family and backend."""
import os
import subprocess
import sys


def test_doctor_reports_backends():
    result = subprocess.run([sys.executable, "-m", "pyalign.cli", "doctor"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for family in ("logprobs", "linear_logprobs", "kl", "preference", "weights"):
        assert f"{family}" in result.stdout
        assert "auto ->" in result.stdout
    assert "torch" in result.stdout and "eager   ok" in result.stdout


def test_unknown_subcommand_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "pyalign.cli", "frobnicate"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_doctor_extension_status_agrees_with_the_backend_table():
    # the status is read after the table loaded the backends, so the two cannot contradict
    env = {k: v for k, v in os.environ.items() if k not in ("PYALIGN_BACKEND", "PYALIGN_DISABLE_EXT")}
    result = subprocess.run([sys.executable, "-m", "pyalign.cli", "doctor"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (table_cpu,) = [line.split() for line in lines
                    if line.split()[:3] == ["logprobs", "cpu", "cpu"]]
    (built,) = [line for line in lines if line.startswith("extension    cpu_built:")]
    assert built.endswith(str(table_cpu[3] == "ok")), result.stdout
    (summary,) = [line for line in lines if line.startswith("extension    cpu:")]
    if table_cpu[3] == "ok":
        assert "cache" in summary or "built this run" in summary, summary
    else:
        assert "unavailable" in summary, summary
