"""The README's usage example runs as written, its two set-up commands are the ones CI runs, and its
"Train on your own model and data" command runs on a tiny model and the JSONL rows it shows."""
import json
import pathlib
import re
import shlex

import pytest

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


def test_readme_own_model_and_data_command_runs(tmp_path):
    """The command as written, on a tiny model (tests/hf_models.py) and the README's JSONL rows,
    shortened to 2 steps, lengths that fit the tiny model, and small batches by a config file
    (flags and the file compose)."""
    from hf_models import save_tiny_model
    from pyalign.cli.train import main
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Train on your own model and data", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    rows = [json.loads(line) for line in
            re.search(r"```json\n(.*?)\n```", section, re.S).group(1).splitlines()]
    argv = shlex.split(command)
    assert argv[:2] == ["pyalign", "train"]
    model = save_tiny_model(tmp_path / "model", "llama")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 2))
    small = tmp_path / "small.toml"
    small.write_text("batch_size = 4\nmicro_batch_size = 2\neval_every = 0\nfinal_eval_batch_size = 2\n"
                     "max_completion_length = 4\n")
    swap = {"path/to/model": model, "prefs.jsonl": str(data), "runs/my-tr-dpo": str(tmp_path / "run"),
            "200": "2", "1024": "64", "512": "32"}  # the tiny model has 128 positions
    argv = [swap.get(arg, arg) for arg in argv[2:]]
    assert main(argv + ["--config", str(small), "--no-progress"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000002.pt").exists()


def _section(readme: str, title: str) -> str:
    return re.split(r"\n##+ ", readme.split(f"### {title}\n", 1)[1], maxsplit=1)[0]


def test_readme_transformers_and_trl_examples_run(tmp_path, monkeypatch):
    """The two code blocks of "Use with transformers / TRL", as written, on a tiny local model
    (the only change: its path). On this CPU-only machine the TRL block trains its 3 steps (3
    epochs of its 2-row dataset) in fp32, as it says."""
    import torch
    pytest.importorskip("trl.trainer.dpo_trainer",
                        reason="trl or datasets is not installed ([test] extra)")
    pytest.importorskip("datasets", reason="datasets is not installed ([test] extra)")

    import pyalign.integrations.trl
    from hf_models import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    for title in ("TRL's trainers on pyalign kernels", "Log-probs from any causal LM"):
        block = re.search(r"```python\n(.*?)```", _section(readme, title), re.S).group(1)
        assert "path/to/model" in block
        namespace: dict = {}
        try:
            exec(compile(block.replace("path/to/model", model_dir), "README.md", "exec"),
                 namespace)
            assert pyalign.integrations.trl.is_enabled() == title.startswith("TRL")
        finally:
            pyalign.integrations.trl.disable()
        if title.startswith("TRL"):
            state = namespace["trainer"].state
            assert state.global_step == 3, state
            assert torch.isfinite(torch.tensor(state.log_history[-1]["train_loss"]))
        else:
            out, fused = namespace["out"], namespace["fused"]
            length = namespace["batch"].input_ids.shape[1]
            assert out.logprobs.shape == out.mask.shape == (2, length - 1)
            assert not out.mask[1].all()  # the padded row
            torch.testing.assert_close(fused.log_probs, out.logprobs)
            assert namespace["model"].get_output_embeddings().weight.grad is not None
