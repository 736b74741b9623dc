"""benchmarks/gpu_check.sh and benchmarks/gpu_report.py: on a machine without a CUDA GPU the
script prints that it needs one and exits 0; the report helper turns a junit XML (or a cut-short
verbose log) and a bench JSON into per-file pass/fail and a table with peak memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    assert not out.exists()


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.ops.test_kl" name="test_a[triton]" time="0.1"/>
<testcase classname="tests.ops.test_kl" name="test_b" time="0.1"><failure message="x"/></testcase>
<testcase classname="tests.toolchain.test_cpp_nvcc" name="test_c" time="0.1">
<skipped type="pytest.skip" message="no nvcc"/></testcase>
<testcase classname="tests.ops.test_preference" name="test_d" time="0.1">
<skipped type="pytest.xfail" message="known"/></testcase>
</testsuite></testsuites>
"""

BENCH = {"cases": [{"title": "kl_penalty fwd+bwd", "params": {"N": 4096, "device": "cuda"},
                    "rows": [{"name": "pyalign triton", "backend": "triton", "status": "ok",
                              "median_ms": 0.25, "peak_extra_mib": 1.5,
                              "ratios": {"vs eager": 3.0}}]}]}


def test_report_from_junit_and_bench_json(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    assert gpu_report.main([str(tmp_path), "--tests-rc", "1", "--seconds", "12"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    per_file = report["tests"]["per_file"]
    assert per_file["tests/ops/test_kl.py"]["passed"] == 1
    assert per_file["tests/ops/test_kl.py"]["failed"] == 1
    assert per_file["tests/toolchain/test_cpp_nvcc.py"]["skipped"] == 1
    assert per_file["tests/ops/test_preference.py"]["xfailed"] == 1
    assert report["bench"]["rows"][0]["peak_extra_mib"] == 1.5
    text = (tmp_path / "report.md").read_text()
    assert "| tests/ops/test_kl.py | 1 | 1 | 0 | 0 | 0 | FAIL |" in text
    assert "| kl_penalty fwd+bwd | N=4096 device=cuda | pyalign triton | triton | ok | 0.250 | 1.5 |" in text
    assert "max_memory_allocated" in text


def test_report_from_a_cut_short_log(tmp_path):
    (tmp_path / "tests.log").write_text(
        "tests/ops/test_kl.py::test_a[triton] PASSED [  1%]\n"
        "tests/ops/test_kl.py::test_b FAILED [  2%]\n"
        "tests/test_cli.py::test_c PASSED [  3%]\n")
    assert gpu_report.main([str(tmp_path), "--tests-rc", "124", "--bench-rc", "124"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tests"]["source"] == "log" and report["tests"]["timed_out"]
    assert report["tests"]["per_file"]["tests/ops/test_kl.py"] == {
        "passed": 1, "failed": 1, "error": 0, "skipped": 0, "xfailed": 0}
    assert report["tests"]["totals"]["passed"] == 2
    assert report["bench"]["rows"] == []
