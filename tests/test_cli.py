"""`pyalign doctor` runs in a fresh process and reports every op family and backend."""
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
