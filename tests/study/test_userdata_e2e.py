"""`pyalign study --model DIR --data FILE` end to end on a tiny Llama (study_helpers.
write_user_files): with a gold reward-model directory and an RL proxy from a reward function,
through the process pool; without a gold reward (the held-out preference accuracy, named as
such in the report), through --emit-configs, `pyalign train --config` per point and
--aggregate."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
from study_helpers import run_study_cli

GRID = """
seeds = [0]
epochs = [0.5, 1.0]
[preference]
lr = 0.02
max_completion_length = 6
[rl]
lr = 0.02
max_completion_length = 6
per_device_batch_size = 16
[eval]
prompts = 6
heldout = 6
"""


def _grid(tmp_path, algos: str) -> str:
    path = tmp_path / "grid.toml"
    path.write_text(GRID + algos)
    return str(path)


def _csv(out) -> list[dict]:
    with open(os.path.join(out, "points.csv")) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_gold_reward_model_and_an_rl_proxy(user_files, tmp_path, study_env):
    grid = _grid(tmp_path, "[algos.dpo]\nbeta = [0.1]\n[algos.rloo]\nkl_coef = [0.05]\n")
    out = str(tmp_path / "study")
    result = run_study_cli(["--grid", grid, "--out", out, "--workers", "2", "--model", user_files["model"],
                            "--data", user_files["prefs"], "--gold-reward", user_files["rm"],
                            "--reward", f"{user_files['gold']}:score"], study_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr  # no model-loading bar from the workers
    rows = _csv(out)
    assert len(rows) == 2 * 3  # 2 points, evaluated at steps 0, 4 and 8 (58 rows, batch 8)
    for row in rows:
        assert row["gold_reward"] and row["gold_win_rate"] and float(row["response_length"]) <= 6
        assert (row["proxy_reward"] != "") == (row["algo"] == "rloo")  # the proxy: RL's --reward
        assert float(row["train_preference_accuracy"]) >= 0 and row["preference_accuracy"]
        if row["step"] == "0":
            assert float(row["kl_to_init"]) == 0.0 and float(row["preference_accuracy"]) == 0.5
    assert float(max(rows, key=lambda r: int(r["step"]))["kl_to_init"]) > 0
    report = open(os.path.join(out, "report.md")).read()
    assert f"gold reward, for evaluation only: `{user_files['rm']}`" in report
    assert "gold falls from each run's best evaluation" in report and "held-out accuracy" not in report
    assert "| dpo | gold gain |" in report


@pytest.mark.slow
def test_without_gold_the_report_measures_held_out_accuracy(user_files, tmp_path, study_env):
    grid = _grid(tmp_path, "[algos.dpo]\nbeta = [0.1]\n[algos.tr-dpo]\ntr_tau = [2]\n")
    out = str(tmp_path / "study")
    emitted = run_study_cli(["--grid", grid, "--emit-configs", out, "--model", user_files["model"],
                             "--data", user_files["prefs"]], study_env)
    assert emitted.returncode == 0, emitted.stderr[-3000:]
    with open(os.path.join(out, "commands.txt")) as handle:
        commands = [shlex.split(line) for line in handle if line.strip()]
    assert len(commands) == 2
    for command in commands:  # each point where a scheduler would run it: another directory
        assert command[:2] == ["pyalign", "train"]
        done = subprocess.run([sys.executable, "-m", "pyalign.cli", *command[1:]], env=study_env,
                              cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    result = run_study_cli(["--aggregate", out], study_env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _csv(out)
    assert len(rows) == 2 * 3 and all(row["gold_reward"] == "" for row in rows)
    assert {row["point_id"]: row["preference_accuracy"] for row in rows if row["step"] == "0"} == {
        "dpo__beta=0.1__seed0": "0.5", "tr-dpo__tr_tau=2__seed0": "0.5"}
    report = open(os.path.join(out, "report.md")).read()
    assert "no gold reward: quality is the held-out preference accuracy" in report
    verdicts = report.split("## Verdicts", 1)[1].split("## Figures", 1)[0]
    assert "gold" not in verdicts.lower()
    assert "held-out accuracy falls from each run's best evaluation" in verdicts
    assert "on held-out preference accuracy" in verdicts and "| dpo | accuracy − ½ |" in verdicts
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {f["target"] for f in summary["fits"]} == {"preference_margin", "preference_accuracy"}
