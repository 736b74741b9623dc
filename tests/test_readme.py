"""The README's usage example runs as written, and its two set-up commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].loss.isfinite()
    assert namespace["logprobs"].shape == (4, 128)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2, commands
    main_job, test_job = commands
    assert "pip install torch==2.13.0" in main_job and "pyalign train" in main_job
    assert "pip install torch==2.13.0" in test_job and "pytest" in test_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci
    assert 'pip install -q -e ".[test]"' in ci and "python -m pytest" in ci
