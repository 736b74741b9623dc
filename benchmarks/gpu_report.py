"""Report of benchmarks/gpu_check.sh: pass/fail per test file (from pytest's junit XML, or from
its verbose log when the run was cut short) and the benchmark table with peak memory, as
OUT_DIR/report.md and OUT_DIR/report.json.

Peak memory: the bench JSON's ``peak_extra_mib`` per row is ``torch.cuda.max_memory_allocated``
after ``torch.cuda.reset_peak_memory_stats``, minus the memory allocated before the call (the
inputs): the extra memory one forward + backward call needs, in MiB.

    python benchmarks/gpu_report.py OUT_DIR [--tests-rc N] [--bench-rc N] [--seconds S]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
VERBOSE_LINE = re.compile(r"^(tests/\S+?\.py)::\S.*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _file_of(testcase: ET.Element) -> str:
    classname = testcase.get("classname", "")
    path = testcase.get("file")
    if path:
        return path
    # importlib mode: classname is the dotted module path (tests.ops.test_kl[.Class])
    parts = classname.split(".")
    while parts and not parts[-1].startswith("test_"):
        parts.pop()
    return "/".join(parts) + ".py" if parts else classname


def results_from_junit(path: Path) -> dict[str, dict[str, int]]:
    per_file: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if "failure" in tags:
            outcome = "failed"
        elif "error" in tags:
            outcome = "error"
        elif "skipped" in tags:
            skipped = case.find("skipped")
            outcome = "xfailed" if skipped is not None and skipped.get("type") == "pytest.xfail" \
                else "skipped"
        else:
            outcome = "passed"
        per_file[_file_of(case)][outcome] += 1
    return dict(per_file)


def results_from_log(path: Path) -> dict[str, dict[str, int]]:
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
             "XFAIL": "xfailed", "XPASS": "failed"}
    per_file: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    seen = set()
    for line in path.read_text(errors="replace").splitlines():
        match = VERBOSE_LINE.match(line)
        if match and line not in seen:
            seen.add(line)
            per_file[match.group(1)][names[match.group(2)]] += 1
    return dict(per_file)


def bench_rows(path: Path) -> list[dict]:
    payload = json.loads(path.read_text())
    rows = []
    for case in payload.get("cases", []):
        params = " ".join(f"{k}={v}" for k, v in case.get("params", {}).items())
        for row in case.get("rows", []):
            rows.append({"case": case.get("title", "?"), "params": params,
                         "name": row.get("name"), "backend": row.get("backend"),
                         "status": row.get("status"), "median_ms": row.get("median_ms"),
                         "peak_extra_mib": row.get("peak_extra_mib"),
                         "ratios": row.get("ratios", {})})
    return rows


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def build_report(out: Path, tests_rc: int, bench_rc: int, seconds: float | None) -> dict:
    junit, log = out / "tests.xml", out / "tests.log"
    if junit.exists():
        per_file, source = results_from_junit(junit), "junit"
    elif log.exists():
        per_file, source = results_from_log(log), "log"
    else:
        per_file, source = {}, "none"
    bench_json = out / "bench.json"
    rows = bench_rows(bench_json) if bench_json.exists() else []
    totals = dict.fromkeys(OUTCOMES, 0)
    for counts in per_file.values():
        for key in OUTCOMES:
            totals[key] += counts[key]
    return {"tests": {"exit_code": tests_rc, "timed_out": tests_rc in (124, 130, 137),
                      "source": source, "totals": totals, "per_file": per_file},
            "bench": {"exit_code": bench_rc, "timed_out": bench_rc in (124, 137),
                      "rows": rows,
                      "peak_memory": "peak_extra_mib = torch.cuda.max_memory_allocated after "
                                     "reset_peak_memory_stats, minus the memory allocated "
                                     "before the call (the inputs), in MiB"},
            "seconds": seconds}


def markdown(report: dict) -> str:
    tests, bench = report["tests"], report["bench"]
    lines = ["# pyalign GPU check", ""]
    if report["seconds"] is not None:
        lines.append(f"Total time: {report['seconds']:.0f} s.")
        lines.append("")
    status = "timed out" if tests["timed_out"] else f"exit code {tests['exit_code']}"
    lines += [f"## Tests (PYALIGN_TEST_DEVICE=cuda): {status}", "",
              " ".join(f"{k}: {v}" for k, v in tests["totals"].items()), "",
              "| file | " + " | ".join(OUTCOMES) + " | result |",
              "|---|" + "---:|" * len(OUTCOMES) + "---|"]
    for path in sorted(tests["per_file"]):
        counts = tests["per_file"][path]
        verdict = "FAIL" if counts["failed"] or counts["error"] else "pass"
        lines.append(f"| {path} | " + " | ".join(str(counts[k]) for k in OUTCOMES)
                     + f" | {verdict} |")
    status = "timed out" if bench["timed_out"] else f"exit code {bench['exit_code']}"
    lines += ["", f"## Benchmarks: {status}", "",
              f"Peak memory: {bench['peak_memory']}.", "",
              "| case | params | candidate | backend | status | median ms | peak extra MiB | ratios |",
              "|---|---|---|---|---|---:|---:|---|"]
    for row in bench["rows"]:
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
        lines.append(f"| {row['case']} | {row['params']} | {row['name']} | {row['backend'] or ''} "
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
