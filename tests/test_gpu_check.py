"""The GPU check's parts that run without a GPU: benchmarks/gpu_check.sh says it needs one and
exits 0; benchmarks/gpu_report.py turns a junit XML (or a cut-short verbose log, xdist's too) and
the head benchmark's JSON into per-file pass/fail, skip reasons, the rows and each pyalign row
beside the cost model's prediction with a verdict; benchmarks/bench_gpu_head.py runs at a toy
size, keeps to its time budget and splits the triton row by strategy where linear_token_logprobs
takes one; and the suite collects where the packages the GPU machine lacks are absent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign.bench import gpu_cost
from pyalign.bench import linear_logprobs as head_bench
from pyalign.bench.harness import Candidate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu_head  # noqa: E402
import gpu_report  # noqa: E402

# What the GPU machine of the check lacks (it holds torch, triton, transformers, peft and
# pytest-xdist, and what those pull in).
ABSENT_THERE = ("trl", "datasets", "ray", "liger_kernel", "cut_cross_entropy", "tensorboard",
                "wandb", "pandas", "pyarrow")


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
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.ops.test_kl" name="test_a[triton]" time="0.1"/>
<testcase classname="tests.ops.test_kl" name="test_b" time="0.1"><failure message="x"/></testcase>
<testcase classname="tests.toolchain.test_cpp_nvcc" name="test_c" time="0.1">
<skipped type="pytest.skip" message="no nvcc"/></testcase>
<testcase classname="tests.ops.test_kto" name="test_e" time="0.1">
<skipped type="pytest.skip" message="no nvcc"/></testcase>
<testcase classname="tests.ops.test_preference" name="test_d" time="0.1">
<skipped type="pytest.xfail" message="known"/></testcase>
</testsuite></testsuites>
"""

KL_CASE = {"title": "kl_penalty fwd+bwd", "params": {"N": 4096, "device": "cuda"},
           "rows": [{"name": "pyalign triton", "kind": "candidate", "backend": "triton",
                     "status": "ok", "median_ms": 0.25, "peak_extra_mib": 1.5,
                     "ratios": {"vs eager": 3.0}}]}


def test_report_from_junit_and_bench_json(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text(json.dumps({"cases": [KL_CASE]}))
    assert gpu_report.main([str(tmp_path), "--tests-rc", "1", "--seconds", "12"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    per_file = report["tests"]["per_file"]
    assert per_file["tests/ops/test_kl.py"]["passed"] == 1
    assert per_file["tests/ops/test_kl.py"]["failed"] == 1
    assert per_file["tests/toolchain/test_cpp_nvcc.py"]["skipped"] == 1
    assert per_file["tests/ops/test_preference.py"]["xfailed"] == 1
    assert report["tests"]["skip_reasons"] == {"no nvcc": 2}
    assert report["bench"]["rows"][0]["peak_extra_mib"] == 1.5
    text = (tmp_path / "report.md").read_text()
    assert "| tests/ops/test_kl.py | 1 | 1 | 0 | 0 | 0 | FAIL |" in text
    assert "- 2 x no nvcc" in text
    assert "| kl_penalty fwd+bwd | N=4096 device=cuda | pyalign triton | triton | ok | 0.250 | 1.5 |" in text
    assert "| pyalign triton | 0.25 |" in text  # the per-N table
    assert "max_memory_allocated" in text


def test_report_from_a_cut_short_log_plain_and_xdist(tmp_path):
    (tmp_path / "tests.log").write_text(
        "tests/ops/test_kl.py::test_a[triton] PASSED [  1%]\n"
        "tests/ops/test_kl.py::test_b FAILED [  2%]\n"
        "[gw3] [  3%] PASSED tests/test_cli.py::test_c \n"
        "[gw0] [ 4%] SKIPPED tests/test_cli.py::test_d[x y] \n"
        "tests/ops/test_kl.py::test_e \n")  # xdist's "started" line: no outcome
    assert gpu_report.main([str(tmp_path), "--tests-rc", "124", "--bench-rc", "124"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tests"]["source"] == "log" and report["tests"]["timed_out"]
    assert report["tests"]["per_file"]["tests/ops/test_kl.py"] == {
        "passed": 1, "failed": 1, "error": 0, "skipped": 0, "xfailed": 0}
    assert report["tests"]["per_file"]["tests/test_cli.py"]["skipped"] == 1
    assert report["tests"]["totals"]["passed"] == 2
    assert report["bench"]["rows"] == []


def _head_row(name, ms, kind="candidate"):
    return {"name": name, "kind": kind, "backend": "triton" if "[triton]" in name else None,
            "status": "ok" if ms is not None else "error: OutOfMemoryError: x",
            "median_ms": ms, "peak_extra_mib": 10.0, "ratios": {}}


def _middle(path, shape, gpu):
    low, high = gpu_cost.prediction(gpu_cost.paths(shape, gpu)[path], gpu)
    return (low * high) ** 0.5 * 1e3, low * 1e3, high * 1e3


@pytest.mark.parametrize("device_name, gpu", [("NVIDIA H100 80GB HBM3", gpu_cost.H100),
                                              ("NVIDIA H200", gpu_cost.H200)])
def test_report_puts_the_rows_beside_the_cost_model(tmp_path, device_name, gpu):
    shape = gpu_cost.Shape(8192, 4096, 128256)
    fused_ms, _, _ = _middle("fused tiles (Triton, atomics)", shape, gpu)
    _, _, chunked_high = _middle("chunked, recompute", shape, gpu)
    _, kept_low, _ = _middle("chunked, logits kept (memory_budget)", shape, gpu)
    floor_ms = 6 * 8192 * 4096 * 128256 / (0.72 * gpu.bf16_flops) * 1e3  # 72 % of the peak
    name = "pyalign linear_token_logprobs [triton]"
    case = {"title": "linear_token_logprobs fwd+bwd",
            "params": {"N": 8192, "H": 4096, "V": 128256, "dtype": "bfloat16", "device": "cuda"},
            "floor": "floor: the 3 bare matmuls", "notes": ["strategy auto chose: chunked"],
            "rows": [_head_row(f"{name} strategy=fused", fused_ms),
                     _head_row(f"{name} strategy=chunked", 5 * chunked_high),
                     _head_row(f"{name} strategy=auto", 5 * chunked_high),
                     _head_row(f"{name} strategy=chunked memory_budget=all logits",
                               0.5 * kept_low),
                     _head_row("pyalign linear_token_logprobs [eager]", 50.0),
                     _head_row("Liger LigerFusedLinearCrossEntropyFunction", 60.0, "baseline"),
                     _head_row("floor: the 3 bare matmuls", floor_ms, "floor")]}
    payload = {"environment": {"device": "cuda", "device_name": device_name, "torch": "2.11.0",
                               "python": "3.12.3", "optional": {"Liger-Kernel": True}},
               "cases": [case, {**case, "title": case["title"] + " (with entropy)",
                                "rows": [_head_row(f"{name} strategy=chunked", None)]}],
               "skipped_cases": [{"N": 16384, "entropy": True, "reason": "time budget: x"}]}
    (tmp_path / "bench.json").write_text(json.dumps(payload))
    gpu_report.main([str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    model = report["model"]
    assert model["gpu"] == gpu.name and model["note"] is None
    verdicts = {(row["row"].split("] ")[-1], row["path"], row["entropy"]): row["verdict"]
                for row in model["rows"]}
    assert verdicts == {
        ("strategy=fused", "fused tiles (Triton, atomics)", False): "confirmed",
        ("strategy=fused", "fused tiles, 128x128 backward, grouped order", False):
            "refuted: slower than predicted",
        ("strategy=chunked", "chunked, recompute", False): "refuted: slower than predicted",
        ("strategy=auto", "chunked, recompute", False): "refuted: slower than predicted",
        ("strategy=chunked memory_budget=all logits", "chunked, logits kept (memory_budget)",
         False): "refuted: faster than predicted",
        ("strategy=chunked", "chunked, recompute", True):
            "not measured: error: OutOfMemoryError: x"}
    claims = {(c["claim"], c["where"]): c["verdict"] for c in model["claims"]}
    assert claims[("chunked beats fused", "N=8192")] == "refuted"
    assert claims[("auto picks the faster strategy", "N=8192")] == "refuted"
    assert claims[("bf16 GEMMs at 65-80 % of the peak", "N=8192")] == "confirmed"
    assert claims[("chunked beats fused", "N=8192 with entropy")].startswith("not measured")
    assert [r["record"] for r in report["records"]] == ["Liger per-token log-prob head"]
    text = (tmp_path / "report.md").read_text()
    assert f"Predicted ranges for the {gpu.name}" in text
    assert "- not run: N=16384 entropy=True: time budget: x" in text
    assert "**refuted**" in text and "**confirmed**" in text


def test_report_without_a_gpu_run_compares_nothing(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"environment": {"device": "cpu"},
                                                     "cases": []}))
    gpu_report.main([str(tmp_path)])
    assert json.loads((tmp_path / "report.json").read_text())["model"]["rows"] == []
    assert "not measured on a CUDA GPU" in (tmp_path / "report.md").read_text()


def test_bench_gpu_head_at_a_toy_size_keeps_its_budget(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_gpu_head.parse_args(["--device", "cpu", "--dtype", "float32", "--tokens", "16,32",
                                      "--hidden", "16", "--vocab", "300", "--entropy", "no",
                                      "--no-peers", "--no-memory", "--no-progress", "--reps", "1",
                                      "--threads", "1", "--budget-s", "0", "--json", str(out)])
    assert bench_gpu_head.run(args) == 0
    payload = json.loads(out.read_text())
    (case,) = payload["cases"]  # the first case always runs; the second would pass the budget
    assert case["params"] == {"N": 16, "H": 16, "V": 300, "dtype": "float32", "device": "cpu"}
    assert all(not row["status"].startswith("error") for row in case["rows"])
    assert any(row["name"] == "floor: the 3 bare matmuls" and row["median_ms"] > 0
               for row in case["rows"])
    (skipped,) = payload["skipped_cases"]
    assert skipped["N"] == 32 and skipped["reason"].startswith("time budget")
    assert "N=32 entropy=False: not run (time budget" in capsys.readouterr().out


def test_anchor_cases_are_the_cost_models_shapes_without_entropy_first():
    cases = [(n, entropy) for n, entropy, _ in head_bench.anchor_builders()]
    assert cases == [(n, e) for e in (False, True) for n in gpu_cost.ANCHOR_TOKENS]


def _pyalign_rows():
    """pyalign's rows through _with_strategies; (rows, the calls they made, the case's notes)."""
    calls, notes = [], []

    def run_on(backend, **options):
        calls.append((backend, options))
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    ours = [Candidate("pyalign linear_token_logprobs [triton]", lambda: None, backend="triton"),
            Candidate("pyalign linear_token_logprobs [eager]", lambda: None, backend="eager")]
    return head_bench._with_strategies(ours, run_on, None, hidden, weight, notes), calls, notes


def test_without_a_strategy_argument_pyalign_has_one_row_per_backend(monkeypatch):
    def without_strategy(hidden, weight, labels, *, backend="auto"):
        raise AssertionError("not called")
    monkeypatch.setattr(pyalign, "linear_token_logprobs", without_strategy)
    rows, calls, notes = _pyalign_rows()
    assert [row.name for row in rows] == ["pyalign linear_token_logprobs [triton]",
                                          "pyalign linear_token_logprobs [eager]"]
    assert calls == [] and notes == []


@pytest.mark.parametrize("hook", [True, False])
def test_with_a_strategy_argument_the_triton_row_splits_and_auto_notes_its_choice(monkeypatch,
                                                                                   hook):
    def with_strategy(hidden, weight, labels, *, strategy="auto", backend="auto"):
        raise AssertionError("not called")
    monkeypatch.setattr(pyalign, "linear_token_logprobs", with_strategy)
    if hook:
        monkeypatch.setattr(pyalign.backends, head_bench.AUTO_CHOICE_HOOK,
                            lambda hidden, weight: "chunked", raising=False)
    else:
        monkeypatch.delattr(pyalign.backends, head_bench.AUTO_CHOICE_HOOK, raising=False)
    monkeypatch.delenv(head_bench.STRATEGY_ENV, raising=False)
    rows, calls, notes = _pyalign_rows()
    assert [row.name.split("[triton] ")[-1] for row in rows] == [
        "strategy=fused", "strategy=chunked", "strategy=auto",
        "strategy=chunked memory_budget=all logits", "pyalign linear_token_logprobs [eager]"]
    for row in rows[:4]:
        row.run()
    assert calls == [("triton", {"strategy": "fused"}), ("triton", {"strategy": "chunked"}),
                     ("triton", {"strategy": "auto"}),
                     ("triton", {"strategy": "chunked", "memory_budget": 4 * 10 * 4})]
    (note,) = notes
    rows[2].run()
    assert notes == [note]  # noted once, after the first call
    if hook:
        assert note == "strategy auto chose: chunked"
        assert gpu_report.AUTO_NOTE.match(note).group(1) == "chunked"
    else:
        assert "pyalign doctor" in note and not gpu_report.AUTO_NOTE.match(note)


def test_with_the_modes_each_backend_gets_a_batch_invariant_row_and_triton_a_deterministic_one(
        monkeypatch):
    def with_modes(hidden, weight, labels, *, backend="auto", batch_invariant=False,
                   deterministic=False):
        raise AssertionError("not called")
    monkeypatch.setattr(pyalign, "linear_token_logprobs", with_modes)
    calls, notes = [], []
    ours = [Candidate("pyalign linear_token_logprobs [triton]", lambda: None, backend="triton"),
            Candidate("pyalign linear_token_logprobs [cpu]", lambda: None, backend="cpu")]
    rows = head_bench._mode_rows(ours, lambda backend, **options: calls.append((backend, options)),
                                 None, notes)
    assert [row.name for row in rows] == [
        "pyalign linear_token_logprobs [triton] batch_invariant=True",
        "pyalign linear_token_logprobs [triton] deterministic=True",
        "pyalign linear_token_logprobs [cpu] batch_invariant=True"]
    for row in rows:
        row.run()
    assert calls == [("triton", {"batch_invariant": True}), ("triton", {"deterministic": True}),
                     ("cpu", {"batch_invariant": True})]
    assert len(notes) == 1 and "deterministic" in notes[0]
    assert gpu_report.model_paths(rows[0].name, "chunked") == ()
    assert gpu_report.model_paths(rows[1].name, None) == (gpu_report.CHUNKED_PATH,)


def test_liger_row_says_why_when_its_gpu_kernel_does_not_load(monkeypatch):
    scaled = pytest.importorskip("liger_kernel.ops.fused_linear_scaled_cross_entropy",
                                 reason="Liger-Kernel is not installed (a benchmark peer)")

    def cute_dsl_missing(device):
        raise ModuleNotFoundError("No module named 'cutlass'")
    monkeypatch.setattr(scaled, "_resolve_implementation", cute_dsl_missing)
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    (row,) = head_bench._liger_candidates(hidden, weight, torch.randint(0, 10, (4,)), False,
                                          None, None, [], lambda kind: None)
    assert row.run is None and row.status.startswith("skipped: on this GPU Liger runs its CuTe")
    assert "No module named 'cutlass'" in row.status


HIDER = '''import sys
HIDDEN = frozenset({hidden!r})


def _hidden(name):
    return name.lower().replace("-", "_").partition(".")[0] in HIDDEN


class Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if _hidden(name) or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", lambda *a, **k: [])(*args, **kwargs)
        return [dist for dist in found if not _hidden(dist.metadata["Name"] or "")]

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [finder if getattr(finder, "__module__", "") == "_frozen_importlib"
                    else Hiding(finder) for finder in sys.meta_path]
'''


def test_the_suite_collects_without_what_the_gpu_machine_lacks(tmp_path):
    """A sitecustomize on PYTHONPATH hides the packages (imports and metadata): collecting the
    suite must give no error (tests needing them skip with the reason when they run)."""
    (tmp_path / "sitecustomize.py").write_text(HIDER.format(hidden=ABSENT_THERE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                            "print(u.find_spec('trl'), u.find_spec('torch') is not None)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["None", "True"], probe.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                             "-p", "no:xdist", str(ROOT / "tests")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " error" not in result.stdout.splitlines()[-1], result.stdout[-3000:]
