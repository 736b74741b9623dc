"""The tiny grid end to end: 2 workers; killed in the middle and resumed (finished points
skipped) to the same CSV as an uninterrupted run; --emit-configs + `pyalign train --config` +
--aggregate gives the same CSV; the Ray launcher on a local Ray instance too; the report embeds
the fit table and the PNGs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from study_helpers import EVALUATIONS, POINTS, read_csv, run_study_cli


def test_pool_run_writes_one_row_per_evaluation_and_the_csv(pool_run):
    points = sorted(os.listdir(os.path.join(pool_run, "points")))
    assert len(points) == POINTS
    rows = []
    for name in points:
        with open(os.path.join(pool_run, "points", name, "evals.jsonl")) as handle:
            mine = [json.loads(line) for line in handle]
        assert [r["step"] for r in mine] == sorted(r["step"] for r in mine) and len(mine) == EVALUATIONS
        assert mine[0]["step"] == 0 and mine[0]["kl_to_init"] == 0.0  # the initial model itself
        assert mine[-1]["kl_to_init"] > 0
        rows += mine
    csv_lines = read_csv(pool_run).splitlines()
    assert len(csv_lines) == 1 + POINTS * EVALUATIONS
    header = csv_lines[0].split(",")
    for column in ("kl_to_init", "kl_to_ref", "gold_reward", "gold_win_rate", "proxy_reward",
                   "response_length", "perplexity", "epoch", "seed"):
        assert column in header
    assert {r["method"] for r in rows} == {"dpo", "rloo", "rloo (no KL)"}
    for r in rows:
        assert 0 <= r["gold_win_rate"] <= 1 and r["perplexity"] > 1 and 0 < r["response_length"] <= 6


def test_report_and_pngs_exist_and_embed_the_fit_table(pool_run):
    report = open(os.path.join(pool_run, "report.md")).read()
    assert "| method | R on | a | b | d* = exp(a/b − 1) |" in report
    for method in ("dpo", "rloo", "rloo (no KL)"):
        assert f"| {method} | gold gain |" in report
    for png in ("gold_vs_sqrt_kl.png", "gold_proxy_vs_progress.png", "length_vs_kl.png"):
        path = os.path.join(pool_run, png)
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    summary = json.load(open(os.path.join(pool_run, "summary.json")))
    assert {f["method"] for f in summary["fits"]} == {"dpo", "rloo", "rloo (no KL)"}


@pytest.mark.slow
def test_killed_in_the_middle_and_resumed_gives_the_uninterrupted_csv(pool_run, tiny_grid, study_env,
                                                                      tmp_path):
    out = str(tmp_path / "study")
    command = [sys.executable, "-m", "pyalign.cli", "study", "--grid", tiny_grid, "--out", out,
               "--workers", "2", "--no-progress"]
    process = subprocess.Popen(command, env=study_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    points = os.path.join(out, "points")

    def finished():
        if not os.path.isdir(points):
            return 0
        return sum(os.path.isfile(os.path.join(points, n, "done.json")) for n in os.listdir(points))
    deadline = time.monotonic() + 240
    while finished() == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its workers, mid-grid
    process.wait()
    done_at_kill = finished()
    assert 0 < done_at_kill < POINTS, "the kill must land between the first and the last point"
    assert not os.path.exists(os.path.join(out, "points.csv"))
    stamps = {name: os.stat(os.path.join(points, name, "done.json")).st_mtime_ns
              for name in os.listdir(points) if os.path.isfile(os.path.join(points, name, "done.json"))}
    result = run_study_cli(["--grid", tiny_grid, "--out", out, "--workers", "2"], study_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_csv(out) == read_csv(pool_run)
    # the finished points were skipped, not run again
    assert stamps == {name: os.stat(os.path.join(points, name, "done.json")).st_mtime_ns for name in stamps}


def test_emit_configs_then_train_each_then_aggregate_equals_the_pool_run(pool_run, tiny_grid, study_env,
                                                                         tmp_path, monkeypatch):
    out = str(tmp_path / "emitted")
    result = run_study_cli(["--grid", tiny_grid, "--emit-configs", out], study_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "points.csv"))
    commands = open(os.path.join(out, "commands.txt")).read().splitlines()
    assert len(commands) == POINTS and all(c.startswith("pyalign train --config ") for c in commands)
    # "another scheduler": the first line as its own process, exactly as written; the others
    # through the same entry point in this process (pyalign.cli.train.main), to save 3 start-ups
    first = subprocess.run([sys.executable, "-m", "pyalign.cli", *commands[0].split()[1:]], env=study_env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    monkeypatch.setenv("PYALIGN_CACHE_DIR", study_env["PYALIGN_CACHE_DIR"])
    from pyalign.cli.train import main
    for command in commands[1:]:
        assert main(command.split()[2:]) == 0
    result = run_study_cli(["--aggregate", out], study_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_csv(out) == read_csv(pool_run)
    assert os.path.isfile(os.path.join(out, "report.md"))


@pytest.mark.slow
def test_ray_launcher_on_a_local_ray_instance_equals_the_pool_run(pool_run, tiny_grid, study_env, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (the [test] extra installs it)")
    out = str(tmp_path / "ray")
    result = run_study_cli(["--grid", tiny_grid, "--out", out, "--launcher", "ray", "--workers", "2"],
                           study_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_csv(out) == read_csv(pool_run)


def test_aggregate_of_a_directory_that_is_no_study_is_a_clear_error(tmp_path, study_env):
    result = run_study_cli(["--aggregate", str(tmp_path)], study_env)
    assert result.returncode == 2
    assert "is not a study directory" in result.stderr
