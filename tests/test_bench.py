"""`pyalign bench` at a tiny size: the JSON/CSV it writes, and the CPU peak-memory method.

Timings are not asserted (benchmarks, never timed tests); what is asserted is that every row is
there, ran, and carries numbers that hang together.
"""
import csv
import json

import torch

from pyalign import backends, cli
from pyalign.bench import harness

MIB = 1 << 20


def test_cpu_peak_memory_measures_known_allocations():
    probe = harness.cpu_memory_probe()
    assert probe["ok"], probe

    logits = torch.randn(300, 1000)

    def fresh_buffer_then_inplace():
        scratch = torch.empty(3 * MIB, dtype=torch.uint8)  # 3 MiB, freed at return
        logits.mul_(1.0)  # in place: nothing new
        return scratch

    # (mul_ by a Python scalar wraps it in a 0-d tensor: a few bytes)
    assert 3 * MIB <= harness.cpu_peak_extra_bytes(fresh_buffer_then_inplace) < 3 * MIB + 1024
    assert harness.cpu_peak_extra_bytes(lambda: logits.mul_(1.0)) < 1024
    # an op that allocates inside aten (log_softmax's output) is counted too
    assert harness.cpu_peak_extra_bytes(lambda: torch.log_softmax(logits, -1)) >= logits.nbytes


def _rows_by_name(case):
    return {row["name"]: row for row in case["rows"]}


def test_bench_quick_writes_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-compile", "--no-progress",
                   "--reps", "2", "--threads", "1", "--cases", "logprobs,linear_logprobs,weights",
                   "--json", str(json_path), "--csv", str(csv_path)])
    assert rc == 0
    stdout = capsys.readouterr().out
    result = json.loads(json_path.read_text())

    env = result["environment"]
    assert env["device"] == "cpu" and env["memory_probe"]["ok"]
    assert set(env["optional"]) == {"Liger-Kernel", "TRL"}
    assert result["reps"] == 2
    assert any("need a CUDA GPU" in note for note in result["notes"])
    titles = [case["title"] for case in result["cases"]]
    assert titles == ["token_logprobs fwd+bwd", "linear_token_logprobs fwd+bwd",
                      "weights ema_/lerp_/copy_ (in place, no autograd)"]

    for case in result["cases"]:
        assert case["title"] in stdout
        rows = _rows_by_name(case)
        for row in case["rows"]:
            assert not row["status"].startswith("error"), row
            if row["status"] == "ok":
                assert len(row["times_ms"]) == 2 and row["median_ms"] > 0, row
                assert row["min_ms"] <= row["median_ms"] and row["peak_extra_mib"] >= 0, row
                for label, reference in case["ratio_to"].items():
                    if rows[reference]["status"] == "ok":
                        expected = rows[reference]["median_ms"] / row["median_ms"]
                        assert abs(row["ratios"][label] - expected) < 1e-9 * expected
        assert rows[case["floor"]]["status"] == "ok"
        assert rows[case["floor"]]["x_floor"] == 1.0

    # every backend that can run the family on CPU is a row (triton only under the interpreter)
    logprobs, linear, weights = result["cases"]
    for case, family, op in ((logprobs, "logprobs", "token_logprobs"),
                             (linear, "linear_logprobs", "linear_token_logprobs")):
        rows = _rows_by_name(case)
        for name in backends.available(family, "cpu"):
            if name != "triton":
                assert rows[f"pyalign {op} [{name}]"]["status"] == "ok"
        compile_rows = [r for r in case["rows"] if r["name"].startswith("torch.compile")]
        assert [r["status"] for r in compile_rows] == ["skipped (--no-compile)"]

    # the memory column measures: N x V fp32 logits (64 x 1000) in the quick suite
    logits_mib = 64 * 1000 * 4 / MIB
    rows = _rows_by_name(logprobs)
    eager = rows["eager log_softmax+gather"]
    assert eager["ratios"]["vs eager"] == 1.0
    assert eager["peak_extra_mib"] >= 2 * logits_mib  # log_softmax output + the logits' grad
    for row in logprobs["rows"]:
        if row["name"].endswith("inplace_backward"):
            assert row["peak_extra_mib"] < logits_mib, row  # the gradient reuses the logits

    for row in weights["rows"]:
        if row["status"] == "ok":
            assert row["gbps"] > 0, row

    with open(csv_path, newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == sum(len(case["rows"]) for case in result["cases"])
    assert {r["case"] for r in csv_rows} == set(titles)


def test_bench_compile_row_runs(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-progress", "--reps", "1",
                   "--threads", "1", "--cases", "kl", "--json", str(json_path)])
    assert rc == 0
    (case,) = json.loads(json_path.read_text())["cases"]
    compiled = _rows_by_name(case)["torch.compile k3 formula"]
    assert compiled["status"] == "ok" and compiled["first_call_s"] > 0
    assert compiled["median_ms"] > 0 and "vs compile" in compiled["ratios"]


def test_bench_unknown_case_is_an_error(capsys):
    assert cli.main(["bench", "--quick", "--cases", "logprobs,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_bench_sizes_and_memory_limit(tmp_path, capsys):
    """--tokens/--hidden/--vocab size the head case; a row whose estimated memory is above
    --memory-limit is skipped with the reason, the others run."""
    json_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--device", "cpu", "--no-compile", "--no-progress", "--reps", "1",
                   "--threads", "1", "--cases", "linear_logprobs", "--tokens", "48", "--hidden",
                   "8", "--vocab", "600", "--memory-limit", str(150e3 / 2 ** 30),
                   "--json", str(json_path)])
    assert rc == 0
    stdout = capsys.readouterr().out
    (case,) = json.loads(json_path.read_text())["cases"]
    assert (case["params"]["N"], case["params"]["H"], case["params"]["V"]) == (48, 8, 600)
    rows = _rows_by_name(case)
    # fp32 logits 48 x 600 = 115 kB: eager holds ~3.5 copies, TRL ~12, the pyalign rows none
    for name in ("eager matmul+log_softmax+gather", "TRL ChunkedLogProbFunction"):
        if name in rows:
            assert rows[name]["status"].startswith("skipped: needs ~") and rows[name]["median_ms"] is None
            assert f"{name}: skipped: needs ~" in stdout
    ours = [row for name, row in rows.items() if name.startswith("pyalign linear_token_logprobs [")
            and "memory_budget" not in name]
    assert ours and all(row["status"] == "ok" and row["median_ms"] > 0 for row in ours)
    assert rows["floor: the 3 bare matmuls"]["median_ms"] > 0


def test_memory_skip_status_names_need_and_limit():
    small = harness.Candidate("small", lambda: None, memory_need=10)
    large = harness.Candidate("large", lambda: None, memory_need=3 * harness.GIB)
    unknown = harness.Candidate("unknown", lambda: None)
    assert harness.memory_skip_status(small, harness.GIB) is None
    assert harness.memory_skip_status(unknown, 1) is None
    assert harness.memory_skip_status(large, None) is None  # nothing known: run it
    status = harness.memory_skip_status(large, harness.GIB)
    assert "~3.0 GiB" in status and "1.0 GiB available" in status
    rows = harness.run_case(harness.Case("t", {}, [small, large]), torch.device("cpu"), reps=1,
                            measure_memory=False, memory_limit=harness.GIB)
    assert rows[0].status == "ok" and rows[0].median_ms is not None
    assert rows[1].status == status and rows[1].median_ms is None


def test_bench_bf16_head_case_times_the_fp32_head_beside_each_backend(tmp_path):
    """--dtype bf16: every pyalign backend row has its fp32-head row (head_dtype=float32), and
    both run."""
    json_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--device", "cpu", "--no-compile", "--no-progress", "--reps", "1",
                   "--threads", "1", "--cases", "linear_logprobs", "--tokens", "16", "--hidden",
                   "8", "--vocab", "64", "--dtype", "bf16", "--json", str(json_path)])
    assert rc == 0
    (case,) = json.loads(json_path.read_text())["cases"]
    rows = _rows_by_name(case)
    plain = [name for name in rows if name.startswith("pyalign linear_token_logprobs [")
             and name.endswith("]")]
    assert plain
    for name in plain:
        fp32_head = rows[f"{name} head_dtype=float32 (fp32 head)"]
        assert rows[name]["median_ms"] > 0 and fp32_head["median_ms"] > 0, fp32_head["status"]
