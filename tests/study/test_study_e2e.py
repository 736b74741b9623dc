"""The tiny grid end to end: 2 workers; a second study into the same --out refused at once; the
study killed in the middle (kill -9 of the study alone) takes its workers with it and resumes
(finished points skipped) to the same CSV as an uninterrupted run; a damaged point is named by
--aggregate and rerun by the next study; a damaged study.json is a clear error; --emit-configs +
`pyalign train --config` + --aggregate gives the same CSV; the Ray launcher on a local Ray
instance too; the report embeds the fit table and the PNGs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from study_helpers import EVALUATIONS, POINTS, alive, descendants, read_csv, run_study_cli


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


def _start_study(tiny_grid, out, env, log):
    command = [sys.executable, "-m", "pyalign.cli", "study", "--grid", tiny_grid, "--out", out,
               "--workers", "2", "--no-progress"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)


def _points_with(out, name):
    points = os.path.join(out, "points")
    if not os.path.isdir(points):
        return 0
    return sum(os.path.isfile(os.path.join(points, n, name)) for n in os.listdir(points))


def _finished(out):
    return _points_with(out, "done.json")


def _wait_for(condition, process, seconds=240):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert condition(), "the study ended or stalled before the moment the test waits for"


@pytest.mark.slow
def test_a_second_study_into_the_same_out_is_refused_and_the_first_finishes(pool_run, tiny_grid, study_env,
                                                                           tmp_path):
    out, log = str(tmp_path / "study"), str(tmp_path / "first.log")
    first = _start_study(tiny_grid, out, study_env, log)
    _wait_for(lambda: _points_with(out, "evals.jsonl") > 0, first)  # a point is running
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first study (and its workers) mid-point
    try:
        second = run_study_cli(["--grid", tiny_grid, "--out", out, "--workers", "2"], study_env)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert f"is in use by another pyalign study (pid {first.pid} on" in second.stderr
    assert first.wait(timeout=600) == 0, open(log).read()[-2000:]
    assert read_csv(out) == read_csv(pool_run)


@pytest.mark.slow
def test_a_killed_study_takes_its_workers_with_it_and_resumes(pool_run, tiny_grid, study_env, tmp_path):
    out = str(tmp_path / "study")
    process = _start_study(tiny_grid, out, study_env, str(tmp_path / "study.log"))
    _wait_for(lambda: _finished(out) > 0, process)
    workers = descendants(process.pid)
    os.kill(process.pid, signal.SIGKILL)  # the study alone: its workers must follow it
    process.wait()
    assert workers, "the study runs its points in worker processes"
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)], "worker processes outlived the killed study"
    done_at_kill = _finished(out)
    assert 0 < done_at_kill < POINTS, "the kill must land between the first and the last point"
    assert not os.path.exists(os.path.join(out, "points.csv"))
    points = os.path.join(out, "points")
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


@pytest.mark.slow
def test_a_damaged_point_is_named_by_aggregate_and_rerun_by_the_next_study(pool_run, tiny_grid, study_env,
                                                                          tmp_path):
    out = str(tmp_path / "study")
    shutil.copytree(pool_run, out)
    name = sorted(os.listdir(os.path.join(out, "points")))[0]
    evals = os.path.join(out, "points", name, "evals.jsonl")
    lines = open(evals).read().splitlines(keepends=True)
    lines[0] = lines[0][: len(lines[0]) // 2] + "\n"  # a torn line, newline-terminated
    with open(evals, "w") as handle:
        handle.write("".join(lines))
    result = run_study_cli(["--aggregate", out], study_env)
    assert result.returncode == 1
    assert f"point {name} is damaged ({evals}" in result.stderr
    assert f"**Damaged point {name}: " in open(os.path.join(out, "report.md")).read()
    assert name not in read_csv(out)
    rerun = run_study_cli(["--grid", tiny_grid, "--out", out, "--workers", "1"], study_env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"point {name} is damaged" in rerun.stderr and "running it again" in rerun.stderr
    assert read_csv(out) == read_csv(pool_run)
    # the launch that reran the point is the study's record; a rerun with nothing left keeps it
    record = open(os.path.join(out, "run.json")).read()
    assert json.loads(record)["workers"] == 1
    again = run_study_cli(["--grid", tiny_grid, "--out", out, "--workers", "2"], study_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert open(os.path.join(out, "run.json")).read() == record
    assert "Last launch: pool with 1 workers" in open(os.path.join(out, "report.md")).read()


def test_a_damaged_study_json_is_a_clear_error(tiny_grid, study_env, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_bytes(b'{"seeds": [0], "alg')
    for argv in (["--aggregate", str(out)], ["--grid", tiny_grid, "--out", str(out)]):
        result = run_study_cli(argv, study_env)
        assert result.returncode == 2
        assert f"pyalign study: error: {out / 'study.json'} is damaged (JSONDecodeError" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_study_into_an_out_another_study_holds_is_refused_at_once(tiny_grid, study_env, tmp_path):
    from pyalign.study.runner import lock_study
    out = tmp_path / "study"
    lock = lock_study(str(out))  # as a running study holds it
    try:
        result = run_study_cli(["--grid", tiny_grid, "--out", str(out)], study_env)
        assert result.returncode == 2
        assert f"{out} is in use by another pyalign study (pid {os.getpid()} on" in result.stderr
        assert os.listdir(out) == [".lock"]  # nothing written
        aggregate = run_study_cli(["--aggregate", str(out)], study_env)
        assert aggregate.returncode == 2 and "is in use by another pyalign study" in aggregate.stderr
    finally:
        lock.release()
