"""`pyalign export` (pyalign/cli/export.py) and `pyalign train --lora`: a run trained a few
steps exports to a directory that ``from_pretrained`` loads into a model with the trained
policy's logits (the embedded task's Llama with a tokenizer of its 64 tokens; a user's model
directory with LoRA, merged or as a peft adapter); ``--lora`` DPO and TR-DPO train only the
adapter (TR-DPO's reference adapter follows the policy's); bad run or output directories get a
clear error."""
import json
import os
import re
import shutil

import pytest
import torch
from trainers.trainer_helpers import TINY_TASK, write_config

from hf_models import tiny_config
from pyalign.cli.export import main as export_main
from pyalign.cli.train import main as train_main
from pyalign.tasks.language import VOCAB_SIZE
from pyalign.trainers.build import build_trainer
from pyalign.trainers.resolve import resolve_config_values
from support import torch_threads

# lr 0.05 so that two steps move the policy (and a zero-initialised LoRA B) well past rounding; a
# constant learning rate (a --model run's default is TRL's linear decay over the run's steps), so
# that a run stopped at step 2 and extended to 3 is the uninterrupted 3-step run
SMALL = dict(batch_size=4, micro_batch_size=4, num_examples=8, eval_every=0,
             final_eval_batch_size=4, lr=0.05, checkpoint_every=0, checkpoint_minutes=0.0,
             lr_scheduler_type="constant")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread beats two fighting over shared cores (as in tests/trainers)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A user's model directory: a tiny Llama over the task's 64 token ids, with a tokenizer of
    its own (words w3..w63, not the task's names)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    path = str(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB_SIZE, max_positions=16)).save_pretrained(path)
    words = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, VOCAB_SIZE)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(path)
    return path


def _train(out, task_cache_dir, **values):
    """Two steps through pyalign train's own settings and trainer; the trainer holds the policy."""
    settings = {"task_cache_dir": task_cache_dir, "task": TINY_TASK, "out": str(out), "steps": 2,
                **SMALL, **values}
    algo, run, config = resolve_config_values(settings, "test")
    config.progress = False
    trainer = build_trainer(algo, run, config, progress=False)
    trainer.train(run["steps"], progress=False)
    return trainer.policy.eval(), trainer


def _token_ids(trainer) -> torch.Tensor:
    prompts = trainer.task.prompts(3, torch.Generator().manual_seed(5))
    responses = torch.randint(0, VOCAB_SIZE, (3, trainer.task.response_len),
                              generator=torch.Generator().manual_seed(6))
    return torch.cat([prompts, responses], dim=1)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def _export(*argv) -> int:
    return export_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, task_cache_dir):
    """A full fine-tune of the embedded task's policy: (trained policy, trainer, run dir)."""
    out = tmp_path_factory.mktemp("task-run") / "run"
    policy, trainer = _train(out, task_cache_dir, algo="dpo")
    return policy, trainer, str(out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, task_cache_dir, model_dir):
    """LoRA DPO on the user's model directory: (trained PeftModel policy, trainer, run dir)."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    policy, trainer = _train(out, task_cache_dir, algo="dpo", model=model_dir, lora="r=4,alpha=8")
    return policy, trainer, str(out)


def test_embedded_task_export_round_trips(task_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    policy, trainer, run_dir = task_run
    out = tmp_path / "exported"
    assert _export(run_dir, "--out", out) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = _token_ids(trainer)
    assert torch.equal(_logits(loaded, ids), _logits(policy, ids))
    assert (_logits(loaded, ids) - _logits(trainer.task.new_policy().eval(), ids)).abs().max() > 1e-3
    # the task's vocabulary as words: ids -> text -> the same ids
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 63]) == ["<pad>", "<bos>", "<eos>", "det0",
                                                                  "stop1"]
    for row in ids.tolist():
        assert tokenizer(tokenizer.decode(row), add_special_tokens=False)["input_ids"] == row
    # bfloat16 on disk: the trained weights, rounded
    out16 = tmp_path / "bf16"
    assert _export(run_dir, "--out", out16, "--dtype", "bfloat16") == 0
    loaded16 = AutoModelForCausalLM.from_pretrained(out16, local_files_only=True, dtype="auto")
    trained = {k: v.to(torch.bfloat16) for k, v in policy.state_dict().items()}
    assert {k: v.dtype for k, v in loaded16.state_dict().items()} == {k: torch.bfloat16 for k in trained}
    assert all(torch.equal(v, trained[k]) for k, v in loaded16.state_dict().items())


def test_lora_merged_export_round_trips(lora_run, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    policy, trainer, run_dir = lora_run
    before = sorted(os.listdir(model_dir))
    assert _export(run_dir, "--out", os.path.join(model_dir, "merged")) == 2  # inside the base model
    assert sorted(os.listdir(model_dir)) == before
    out = tmp_path / "merged"
    assert _export(run_dir, "--out", out, "--lora-mode", "merged") == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not [k for k in loaded.state_dict() if "lora" in k]
    ids = _token_ids(trainer)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert (_logits(policy, ids) - _logits(base, ids)).abs().max() > 1e-4  # the adapter trained
    torch.testing.assert_close(_logits(loaded, ids), _logits(policy, ids), rtol=0, atol=1e-5)
    # the model directory's own tokenizer is copied
    exported, own = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(model_dir)
    assert exported.get_vocab() == own.get_vocab() and exported.convert_ids_to_tokens(5) == "w5"


def test_lora_adapter_export_round_trips(lora_run, model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    policy, trainer, run_dir = lora_run
    out = tmp_path / "adapter"
    assert _export(run_dir, "--out", out, "--lora-mode", "adapter") == 0
    with open(out / "adapter_config.json") as handle:
        adapter_config = json.load(handle)
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(model_dir)
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    ids = _token_ids(trainer)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    loaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(_logits(loaded, ids), _logits(policy, ids))
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(out), ids), _logits(policy, ids))


def test_lora_adapter_export_of_the_embedded_task_writes_its_base(tmp_path, task_cache_dir):
    from peft import AutoPeftModelForCausalLM
    policy, trainer = _train(tmp_path / "run", task_cache_dir, algo="dpo", lora="r=2")
    out = tmp_path / "adapter"
    assert _export(tmp_path / "run", "--out", out, "--lora-mode", "adapter") == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out / "base"))
    ids = _token_ids(trainer)
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(out), ids), _logits(policy, ids))


@pytest.mark.parametrize("algo", ["dpo", "tr-dpo"])
def test_lora_cli_trains_only_the_adapter(algo, tmp_path, task_cache_dir, model_dir):
    """`pyalign train --model DIR --lora r=4`: the base weights stay the model directory's, the
    adapter moves; TR-DPO with a hard update every step keeps the reference adapter equal to the
    policy's after each step."""
    from safetensors.torch import load_file
    extra = dict(tr_tau=1, tr_alpha=1.0) if algo == "tr-dpo" else {}
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo=algo, **SMALL, **extra)
    out = tmp_path / "run"
    assert train_main(["--config", config, "--steps", "3", "--out", str(out), "--model", model_dir,
                       "--lora", "r=4", "--no-progress"]) == 0
    payload = torch.load(out / "checkpoints" / "step-000003.pt", weights_only=True)
    assert payload["run"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                      "target_modules": "all-linear", "bias": "none"}
    policy = payload["policy"]
    adapter = {k for k in policy if "lora_" in k}
    assert adapter and any(policy[k].abs().max() > 0 for k in adapter if "lora_B" in k)
    # every other tensor is the model directory's, bit for bit (peft's base_layer naming aside)
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    prefix = "model.base_model.model."
    for name in set(policy) - adapter:
        assert torch.equal(policy[name], original[name[len(prefix):].replace(".base_layer", "")]), name
    assert len(payload["optimizer"]["state"]) == len(adapter)  # only the adapter trains
    if algo == "tr-dpo":
        strategy = payload["reference_strategy"]
        assert strategy["num_updates"] == 3
        assert {"model." + name for name in strategy["ref"]} == adapter
        for name, tensor in strategy["ref"].items():
            assert torch.equal(tensor, policy["model." + name]), name
    export = tmp_path / "exported"
    assert _export(out, "--out", export) == 0 and (export / "model.safetensors").exists()


def test_export_errors_are_clear(task_run, tmp_path, capsys):
    _, _, run_dir = task_run
    cases = [((tmp_path / "missing", "--out", tmp_path / "o1"), "run directory .*missing does not exist"),
             ((tmp_path, "--out", tmp_path / "o2"), "no checkpoint \\(step-NNNNNN.pt\\) in"),
             ((run_dir, "--out", tmp_path / "o3", "--step", "7"), "no checkpoint of step 7 .* holds steps 2")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases.append(((run_dir, "--out", tmp_path / "full"), "is not empty; pass --overwrite"))
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    checkpoint = damaged / "checkpoints" / "step-000002.pt"
    raw = checkpoint.read_bytes()
    checkpoint.write_bytes(raw[:1000] + bytes([raw[1000] ^ 0x10]) + raw[1001:])
    cases.append(((damaged, "--out", tmp_path / "o4"), f"{checkpoint} is corrupt"))
    cases.append(((run_dir, "--out", tmp_path / "o5", "--lora-mode", "adapter"),
                  "trained the whole model, not a LoRA adapter"))
    # an --out that is, holds or lies inside what the export reads: refused, --overwrite or not
    checkpoints = os.path.join(run_dir, "checkpoints")
    cases += [((run_dir, "--out", os.path.dirname(run_dir), "--overwrite"),
               "holds .*run, which the export reads"),
              ((run_dir, "--out", checkpoints, "--overwrite"), "is .*checkpoints, which the export reads"),
              ((run_dir, "--out", run_dir, "--overwrite"), f"is {run_dir}, which the export reads"),
              ((run_dir, "--out", os.path.join(run_dir, "exported")), f"lies inside {run_dir}")]
    kept = sorted(os.listdir(checkpoints))
    for argv, message in cases:
        capsys.readouterr()
        assert _export(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pyalign export: error: ") and re.search(message, err), err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # a refused --out is untouched
    assert sorted(os.listdir(checkpoints)) == kept and kept
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no staging left behind
    assert _export(run_dir, "--out", tmp_path / "full", "--overwrite") == 0
    assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]


def test_lora_resume_is_exact(tmp_path, task_cache_dir, model_dir):
    """A LoRA TR-DPO run stopped at step 2 and resumed to 3 ends where an uninterrupted run does:
    the same adapter, reference adapter and optimizer state, bit for bit."""
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo="tr-dpo", tr_tau=1, **SMALL)
    common = ["--config", config, "--model", model_dir, "--lora", "r=4", "--no-progress"]
    assert train_main(common + ["--steps", "3", "--out", str(tmp_path / "straight")]) == 0
    assert train_main(common + ["--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert train_main(common + ["--steps", "3", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "step-000003.pt", weights_only=True)
                         for run in ("straight", "resumed"))
    for key in ("policy", "reference_strategy"):
        assert straight[key].keys() == resumed[key].keys()
    assert all(torch.equal(straight["policy"][k], resumed["policy"][k]) for k in straight["policy"])
    assert all(torch.equal(v, resumed["reference_strategy"]["ref"][k])
               for k, v in straight["reference_strategy"]["ref"].items())
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(straight["optimizer"]["state"].values(),
                                                            resumed["optimizer"]["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


@pytest.mark.parametrize("spec, message", [
    ("r=0", "--lora: r must be >= 1, got 0"),
    ("alpha=4", "--lora: r \\(the adapter rank\\) is required"),
    ("r=4,target_modules=nope", "peft cannot wrap the model: Target modules \\{'nope'\\} not found"),
])
def test_bad_lora_is_a_clear_error(spec, message, tmp_path, task_cache_dir, model_dir, capsys):
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo="dpo", **SMALL)
    assert train_main(["--config", config, "--model", model_dir, "--lora", spec, "--steps", "1",
                       "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pyalign train: error: " in err and re.search(message, err), err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_lora_without_peft_is_refused_before_any_work(tmp_path, task_cache_dir, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "peft" else find_spec(name, *args))
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo="dpo", **SMALL)
    assert train_main(["--config", config, "--lora", "r=4", "--steps", "1", "--out",
                       str(tmp_path / "run"), "--no-progress"]) == 2
    assert "--lora needs peft: pip install 'pyalign-lm[lora]'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
