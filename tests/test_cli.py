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


def _run_cli_in_fresh_process(argv: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, set]:
    """`pyalign ARGV` in a new interpreter: its result and the modules it had imported."""
    record = tmp_path / "modules.txt"
    code = ("import sys\nfrom pyalign.cli import main\ntry:\n    code = main(sys.argv[2:])\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            "open(sys.argv[1], 'w').write('\\n'.join(sorted(sys.modules)))\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code, str(record), *argv], capture_output=True,
                            text=True, timeout=120)
    return result, set(record.read_text().split())


def _imported(modules: set, names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_top_level_help_lists_every_subcommand_and_imports_none_of_them(tmp_path):
    from pyalign.cli import SUBCOMMANDS

    result, modules = _run_cli_in_fresh_process(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name, _, help_text in SUBCOMMANDS:
        assert name in result.stdout and help_text.split()[0] in result.stdout
    # the subcommands' modules, torch (its compiler above all), transformers, the study, the bench
    heavy = ("torch", "transformers", "pyalign.backends", "pyalign.trainers",
             "pyalign.study", "pyalign.bench") + tuple(module for _, module, _ in SUBCOMMANDS)
    assert not _imported(modules, heavy)
    # pyalign.ops itself is the list of public ops (pyalign.__all__ derives from it), no op
    assert not [m for m in modules if m.startswith("pyalign.ops.")]


def test_subcommand_help_imports_only_its_own_subcommand(tmp_path):
    result, modules = _run_cli_in_fresh_process(["study", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout  # its own flags, in full
    assert not _imported(modules, ("pyalign.cli.train", "pyalign.cli.bench", "pyalign.cli.export",
                                   "pyalign.bench"))


def test_train_help_is_the_live_parsers_and_imports_no_torch(tmp_path):
    """`pyalign train --help` prints pyalign/cli/help/train.txt, which must be what the parser
    built from the settings dataclasses prints (regenerate: python -m pyalign.cli --write-help)."""
    from pyalign.cli import HELP_DIR, live_help
    stored = (HELP_DIR / "train.txt").read_text()
    assert stored == live_help("train"), "stale: run python -m pyalign.cli --write-help"
    for argv in (["train", "--help"], ["train", "--algo", "dpo", "-h"]):
        result, modules = _run_cli_in_fresh_process(argv, tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == stored and "--learning-rate" in stored and "--beta" in stored
        assert not _imported(modules, ("torch", "transformers", "pyalign.trainers", "pyalign.cli.train"))
