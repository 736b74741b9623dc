"""Report of benchmarks/gpu_check.sh, as OUT_DIR/report.md and OUT_DIR/report.json: pass/fail per
test file (from pytest's junit XML, or from its verbose log when the run was cut short) with the
skip reasons, the head benchmark's rows with peak memory, and each pyalign row beside the time
the cost model (pyalign/bench/gpu_cost.py, docs/gpu.md) predicted for its path and shape, saying
which predictions the measurement confirms and which it refutes.

Peak memory: the bench JSON's ``peak_extra_mib`` per row is ``torch.cuda.max_memory_allocated``
after ``torch.cuda.reset_peak_memory_stats``, minus the memory allocated before the call (the
inputs): the extra memory one forward + backward call needs, in MiB.

    python benchmarks/gpu_report.py OUT_DIR [--tests-rc N] [--bench-rc N] [--seconds S]

It needs neither torch nor a GPU: the cost model is loaded from its file (standard library only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
LOG_OUTCOMES = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                "XFAIL": "xfailed", "XPASS": "failed"}
# pytest -v lines: "tests/x.py::test PASSED [ 1%]", and under xdist "[gw3] [ 1%] PASSED tests/x.py::test"
VERBOSE_LINE = re.compile(r"^(tests/\S+?\.py)::\S.*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
XDIST_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) "
                        r"(tests/\S+?\.py)::\S")
HEAD_CASE = "linear_token_logprobs fwd+bwd"
AUTO_NOTE = re.compile(r"^strategy auto chose: (\w+)$")
FUSED_PATHS = ("fused tiles (Triton, atomics)", "fused tiles, 128x128 backward, grouped order")
CHUNKED_PATH = "chunked, recompute"


def load_cost_model():
    """pyalign/bench/gpu_cost.py by its path: the report runs where pyalign does not import."""
    spec = importlib.util.spec_from_file_location("pyalign_gpu_cost",
                                                  ROOT / "pyalign" / "bench" / "gpu_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- tests

def _file_of(testcase: ET.Element) -> str:
    path = testcase.get("file")
    if path:
        return path
    # importlib mode: classname is the dotted module path (tests.ops.test_kl[.Class])
    parts = testcase.get("classname", "").split(".")
    while parts and not parts[-1].startswith("test_"):
        parts.pop()
    return "/".join(parts) + ".py" if parts else testcase.get("classname", "")


def _outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    if "failure" in tags:
        return "failed"
    if "error" in tags:
        return "error"
    if "skipped" in tags:
        return "xfailed" if case.find("skipped").get("type") == "pytest.xfail" else "skipped"
    return "passed"


def results_from_junit(path: Path) -> tuple[dict, Counter]:
    """(per file: outcome counts, skip reason: count)."""
    per_file: dict = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    reasons: Counter = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = _outcome(case)
        per_file[_file_of(case)][outcome] += 1
        if outcome == "skipped":
            reasons[case.find("skipped").get("message", "").strip() or "(no reason)"] += 1
    return dict(per_file), reasons


def results_from_log(path: Path) -> tuple[dict, Counter]:
    per_file: dict = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    seen = set()
    for line in path.read_text(errors="replace").splitlines():
        plain, xdist = VERBOSE_LINE.match(line), XDIST_LINE.match(line)
        if (plain or xdist) and line not in seen:
            seen.add(line)
            path_name, word = (plain.group(1), plain.group(2)) if plain else \
                (xdist.group(2), xdist.group(1))
            per_file[path_name][LOG_OUTCOMES[word]] += 1
    return dict(per_file), Counter()


# --------------------------------------------------------------------------------------- bench

def bench_rows(payload: dict) -> list[dict]:
    rows = []
    for case in payload.get("cases", []):
        params = case.get("params", {})
        for row in case.get("rows", []):
            rows.append({"case": case.get("title", "?"), "params": params,
                         "name": row.get("name"), "backend": row.get("backend"),
                         "status": row.get("status"), "median_ms": row.get("median_ms"),
                         "peak_extra_mib": row.get("peak_extra_mib"),
                         "ratios": row.get("ratios", {})})
    return rows


def model_paths(row_name: str, auto_choice: str | None) -> tuple[str, ...]:
    """The cost model's paths (gpu_cost.paths names) a pyalign row of the head case runs."""
    if "[triton]" not in row_name or "batch_invariant=True" in row_name:
        return ()  # a batch-invariant row: the fused forward with either backward, no one path
    if "deterministic=True" in row_name:
        return (CHUNKED_PATH,)
    if "strategy=chunked memory_budget" in row_name:
        return ("chunked, logits kept (memory_budget)",)
    if row_name.endswith("strategy=auto"):
        return model_paths(f"[triton] strategy={auto_choice}", None) if auto_choice else ()
    if row_name.endswith("strategy=chunked"):
        return (CHUNKED_PATH,)
    return FUSED_PATHS  # strategy=fused: the kernel as built, beside the first kernel's row


def model_gpu(cost_model, device_name: str):
    """(the cost model's GPU for this device, a note when it is not one the model knows)."""
    for gpu in cost_model.GPUS:
        if gpu.name.split()[0] in device_name:
            return gpu, None
    return cost_model.H100, f"{device_name or 'this device'} is not in the model: H100 SXM figures"


def verdict(measured_ms: float, low_ms: float, high_ms: float) -> str:
    if measured_ms < low_ms:
        return "refuted: faster than predicted"
    if measured_ms > high_ms:
        return "refuted: slower than predicted"
    return "confirmed"


def _auto_choice(case: dict) -> str | None:
    return next((m.group(1) for m in map(AUTO_NOTE.match, case.get("notes", [])) if m), None)


def compare(payload: dict, cost_model) -> dict:
    """Each pyalign head row beside its path's predicted range at the case's shape, and the
    doc's claims that the rows can settle."""
    environment = payload.get("environment", {})
    if environment.get("device") != "cuda":
        return {"gpu": None, "note": "not measured on a CUDA GPU: no predictions to compare",
                "rows": [], "claims": []}
    gpu, note = model_gpu(cost_model, environment.get("device_name", ""))
    rows, by_case = [], []
    for case in payload.get("cases", []):
        params = case.get("params", {})
        if not case.get("title", "").startswith(HEAD_CASE) or params.get("dtype") not in (
                "bfloat16", "float16"):
            continue
        shape = cost_model.Shape(params["N"], params["H"], params["V"], 2)
        predicted = cost_model.paths(shape, gpu)
        auto_choice, measured = _auto_choice(case), {}
        for row in case.get("rows", []):
            measured[row["name"]] = row.get("median_ms")
            for path in model_paths(row["name"], auto_choice):
                low, high = (seconds * 1e3 for seconds in cost_model.prediction(predicted[path], gpu))
                rows.append({"N": params["N"], "entropy": "entropy" in case["title"],
                             "row": row["name"], "path": path, "measured_ms": row.get("median_ms"),
                             "predicted_ms": [low, high],
                             "verdict": "not measured: " + row.get("status", "?")
                             if row.get("median_ms") is None
                             else verdict(row["median_ms"], low, high)})
        by_case.append((params, case, measured, auto_choice))
    return {"gpu": gpu.name, "note": note, "rows": rows, "claims": claims(by_case, gpu)}


def _strategy_ms(measured: dict, strategy: str):
    return next((ms for name, ms in measured.items()
                 if name.endswith(f"[triton] strategy={strategy}") and ms is not None), None)


def claims(by_case: list, gpu) -> list[dict]:
    """docs/gpu.md's claims: chunked beats fused at every anchor shape; auto picks the faster;
    cuBLAS bf16 GEMMs run at 65-80 % of the peak (the bare-matmul floor)."""
    found = []
    for params, case, measured, auto_choice in by_case:
        where = f"N={params['N']}{' with entropy' if 'entropy' in case['title'] else ''}"
        fused, chunked = _strategy_ms(measured, "fused"), _strategy_ms(measured, "chunked")
        if fused is None or chunked is None:
            found.append({"claim": "chunked beats fused", "where": where,
                          "verdict": "not measured (no strategy=fused/chunked rows)"})
        else:
            found.append({"claim": "chunked beats fused", "where": where,
                          "verdict": "confirmed" if chunked < fused else "refuted",
                          "detail": f"chunked {chunked:.3g} ms, fused {fused:.3g} ms"})
            if auto_choice:
                best = "chunked" if chunked < fused else "fused"
                found.append({"claim": "auto picks the faster strategy", "where": where,
                              "verdict": "confirmed" if auto_choice == best else "refuted",
                              "detail": f"auto chose {auto_choice}, faster measured: {best}"})
        floor = measured.get(case.get("floor") or "")
        if floor:
            share = 6.0 * params["N"] * params["H"] * params["V"] / (floor / 1e3) / gpu.bf16_flops
            found.append({"claim": "bf16 GEMMs at 65-80 % of the peak", "where": where,
                          "verdict": "refuted: slower than assumed" if share < 0.65 else
                          "refuted: faster than assumed" if share > 0.80 else "confirmed",
                          "detail": f"the 3 bare matmuls: {floor:.3g} ms, "
                                    f"{share * 100:.0f} % of {gpu.bf16_flops / 1e12:.0f} TFLOP/s"})
    return found


def records_beside(payload: dict, cost_model) -> list[dict]:
    """The records (their authors' numbers) beside the peer rows measured at the same N,
    without entropy: context for the peers' rows, not a prediction."""
    peers = defaultdict(list)
    for case in payload.get("cases", []):
        if case.get("title") != HEAD_CASE:
            continue
        for row in case.get("rows", []):
            if row.get("kind") == "baseline" and row.get("median_ms") is not None and \
                    row["name"].startswith(("Liger", "TRL", "Cut Cross-Entropy")):
                peers[case["params"]["N"]].append(f"{row['name']} {row['median_ms']:.3g} ms")
    return [{"record": what, "gpu": gpu.name, "N": shape.tokens, "V": shape.vocab, "ms": ms,
             "measured_here": peers[shape.tokens]}
            for what, gpu, shape, ms in cost_model.RECORDS if peers.get(shape.tokens)]


# -------------------------------------------------------------------------------------- report

def build_report(out: Path, tests_rc: int, bench_rc: int, seconds: float | None) -> dict:
    junit, log = out / "tests.xml", out / "tests.log"
    if junit.exists():
        (per_file, reasons), source = results_from_junit(junit), "junit"
    elif log.exists():
        (per_file, reasons), source = results_from_log(log), "log"
    else:
        per_file, reasons, source = {}, Counter(), "none"
    totals = {key: sum(counts[key] for counts in per_file.values()) for key in OUTCOMES}
    bench_json = out / "bench.json"
    payload = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    cost_model = load_cost_model()
    return {"tests": {"exit_code": tests_rc, "timed_out": tests_rc in (124, 130, 137),
                      "source": source, "totals": totals, "per_file": per_file,
                      "skip_reasons": dict(reasons.most_common())},
            "bench": {"exit_code": bench_rc, "timed_out": bench_rc in (124, 137),
                      "environment": payload.get("environment", {}),
                      "rows": bench_rows(payload),
                      "skipped_cases": payload.get("skipped_cases", []),
                      "peak_memory": "peak_extra_mib = torch.cuda.max_memory_allocated after "
                                     "reset_peak_memory_stats, minus the memory allocated "
                                     "before the call (the inputs), in MiB"},
            "model": compare(payload, cost_model),
            "records": records_beside(payload, cost_model),
            "seconds": seconds}


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def _tests_markdown(tests: dict) -> list[str]:
    status = "timed out" if tests["timed_out"] else f"exit code {tests['exit_code']}"
    lines = [f"## Tests (PYALIGN_TEST_DEVICE=cuda): {status}", "",
             " ".join(f"{k}: {v}" for k, v in tests["totals"].items()), "",
             "| file | " + " | ".join(OUTCOMES) + " | result |",
             "|---|" + "---:|" * len(OUTCOMES) + "---|"]
    for path in sorted(tests["per_file"]):
        counts = tests["per_file"][path]
        verdict_text = "FAIL" if counts["failed"] or counts["error"] else "pass"
        lines.append(f"| {path} | " + " | ".join(str(counts[k]) for k in OUTCOMES)
                     + f" | {verdict_text} |")
    if tests["skip_reasons"]:
        lines += ["", "Skipped, by reason:", ""]
        lines += [f"- {count} x {reason}" for reason, count in tests["skip_reasons"].items()]
    return lines


def _model_markdown(model: dict, records: list) -> list[str]:
    lines = ["", "## Measured against the cost model (docs/gpu.md)", ""]
    if model["gpu"] is None:
        return lines + [model["note"]]
    if model["note"]:
        lines += [model["note"], ""]
    lines += [f"Predicted ranges for the {model['gpu']} (optimistic-pessimistic, "
              "pyalign/bench/gpu_cost.py; entropy adds no term to the model).", "",
              "| N | entropy | pyalign row | model path | measured ms | predicted ms | verdict |",
              "|---:|---|---|---|---:|---:|---|"]
    for row in model["rows"]:
        low, high = row["predicted_ms"]
        lines.append(f"| {row['N']} | {'yes' if row['entropy'] else 'no'} | {row['row']} | "
                     f"{row['path']} | {_fmt(row['measured_ms'], 2)} | {low:.3g}-{high:.3g} | "
                     f"{row['verdict']} |")
    if not model["rows"]:
        lines.append("(no pyalign head row was measured in bf16)")
    lines += ["", "Claims of docs/gpu.md:", ""]
    lines += [f"- {c['claim']} ({c['where']}): **{c['verdict']}**"
              + (f" ({c['detail']})" if c.get("detail") else "") for c in model["claims"]]
    if records:
        lines += ["", "Records beside the peers measured here (same N, no entropy; the records' "
                  "own GPU and V):", ""]
        lines += [f"- {r['record']}, {r['gpu']}, N={r['N']}, V={r['V']}: {r['ms']} ms; here: "
                  + "; ".join(r["measured_here"]) for r in records]
    return lines


def pivot(rows: list[dict]) -> list[str]:
    """Per case title, one line per candidate and one column per N: median ms (or why none)."""
    lines = []
    titles = list(dict.fromkeys(row["case"] for row in rows))
    for title in titles:
        mine = [row for row in rows if row["case"] == title]
        tokens = sorted({row["params"].get("N") for row in mine}, key=lambda n: (n is None, n))
        cells: dict = defaultdict(dict)
        for row in mine:
            short = "" if row["median_ms"] is None else f"{row['median_ms']:.3g}"
            cells[row["name"]][row["params"].get("N")] = short or (row["status"] or "?").split(":")[0]
        lines += ["", f"{title} (median ms; H={mine[0]['params'].get('H')}, "
                      f"V={mine[0]['params'].get('V')}, {mine[0]['params'].get('dtype')}):", "",
                  "| candidate | " + " | ".join(f"N={n}" for n in tokens) + " |",
                  "|---|" + "---:|" * len(tokens)]
        lines += [f"| {name} | " + " | ".join(by_n.get(n, "") for n in tokens) + " |"
                  for name, by_n in cells.items()]
    return lines


def markdown(report: dict) -> str:
    tests, bench = report["tests"], report["bench"]
    lines = ["# pyalign GPU check", ""]
    env = bench["environment"]
    if env:
        optional = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env.get("optional", {}).items())
        lines += [f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, python "
                  f"{env.get('python', '?')}; peers installed: {optional or '?'}.", ""]
    if report["seconds"] is not None:
        lines += [f"Total time: {report['seconds']:.0f} s.", ""]
    lines += _tests_markdown(tests)
    status = "timed out" if bench["timed_out"] else f"exit code {bench['exit_code']}"
    lines += ["", f"## Head benchmark: {status}"] + pivot(bench["rows"])
    if bench["skipped_cases"]:
        lines += [""] + [f"- not run: N={c['N']} entropy={c['entropy']}: {c['reason']}"
                         for c in bench["skipped_cases"]]
    lines += _model_markdown(report["model"], report["records"])
    lines += ["", "## Every row", "", f"Peak memory: {bench['peak_memory']}.", "",
              "| case | params | candidate | backend | status | median ms | peak extra MiB | ratios |",
              "|---|---|---|---|---|---:|---:|---|"]
    for row in bench["rows"]:
        params = " ".join(f"{k}={v}" for k, v in row["params"].items())
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
        lines.append(f"| {row['case']} | {params} | {row['name']} | {row['backend'] or ''} "
                     f"| {row['status']} | {_fmt(row['median_ms'])} | "
                     f"{_fmt(row['peak_extra_mib'], 1)} | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tests-rc", type=int, default=0)
    parser.add_argument("--bench-rc", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    report = build_report(args.out, args.tests_rc, args.bench_rc, args.seconds)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(f"gpu_check: report in {args.out / 'report.md'} (tests exit {args.tests_rc}, "
          f"bench exit {args.bench_rc})")
    return 0 if args.tests_rc == 0 and args.bench_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
