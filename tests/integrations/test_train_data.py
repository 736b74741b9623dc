"""``pyalign train --model DIR --data FILE`` on a user's model and data (pyalign.data): a tiny
Llama with its own locally trained tokenizer (tests/hf_models.py) and data files made here.

Checked: padded scoring (left-padded prompts, right-padded completions) equals a float64
log-softmax of each unpadded row, forward and gradients; tokenization follows TRL's rules
(chat template, implicit prompt, bos/eos, truncation sides); every input format loads the same
rows; every kind of bad data stops the run before training with the file and row named;
end-to-end runs of DPO/TR-DPO (standard and conversational), KTO, RLOO with a
``module:function`` reward and Elastic Reset with a reward-model directory; resume gives the
same numbers; torchrun with 2 processes matches 1.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from torchrun_helpers import run_torchrun

from hf_models import sample_text, save_tiny_model, train_tokenizer
from pyalign._utils import toml_value

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TIMING_KEYS = ("tokens_per_s", "step_time_s")
# a few tiny steps: what is under test is the data path, not the training
SMALL = ["--steps", "3", "--no-progress"]
SMALL_CONFIG = dict(batch_size=4, micro_batch_size=2, eval_batch_size=4, final_eval_batch_size=4,
                    max_completion_length=6, lr=0.01, eval_every=1)


@pytest.fixture(autouse=True)
def _one_thread():
    from support import torch_threads
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def preference_rows(n=12, seed=0, conversational=False, implicit=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = sample_text(rng, rng.randint(2, 6))
        chosen, rejected = (sample_text(rng, rng.randint(1, 5)) for _ in range(2))
        if conversational:
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected + " no"}]}
        else:
            row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected + " no"}
        if implicit:
            row = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        rows.append(row)
    return rows


def unpaired_rows(n=12, seed=1):
    rng = random.Random(seed)
    return [{"prompt": sample_text(rng, 3), "completion": " " + sample_text(rng, rng.randint(1, 4)),
             "label": i % 3 != 0} for i in range(n)]


def write_config(path, **values):
    lines = [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def train(tmp_path, *argv, **config):
    from pyalign.cli.train import main
    settings = write_config(tmp_path / f"config-{len(os.listdir(tmp_path))}.toml",
                            **{**SMALL_CONFIG, **config})
    return main(["--config", settings, *map(str, argv)])


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in handle]


# -- scoring and tokenization -------------------------------------------------------------------

def test_padded_scoring_equals_each_unpadded_row_forward_and_backward(model_dir):
    """Left-padded prompts, right-padded responses (PAD = -100): per-token log-probs and the
    gradient of a per-token-weighted sum equal a float64 log-softmax of each row alone."""
    from transformers import AutoModelForCausalLM

    from pyalign.data import PAD
    from pyalign.trainers.scoring import ResponseScorer, response_mask
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    lengths = [(3, 5), (6, 2), (1, 4)]  # (prompt, response) tokens of each row
    vocab = model.config.vocab_size
    rows = [(torch.randint(3, vocab, (p,)), torch.randint(3, vocab, (r,))) for p, r in lengths]
    # one column of padding more on each side than the batch needs (as a dataset-wide width)
    width_p, width_r = max(p for p, _ in lengths) + 1, max(r for _, r in lengths) + 1
    prompts = torch.full((3, width_p), PAD)
    responses = torch.full((3, width_r), PAD)
    for i, (p, r) in enumerate(rows):
        prompts[i, width_p - len(p):], responses[i, :len(r)] = p, r
    mask = response_mask(responses, None)
    upstream = torch.randn(3, width_r)
    for fused in (True, False):
        model.zero_grad()
        scorer = ResponseScorer(model, fused_linear=fused, backend="eager")
        logprobs = scorer(prompts, responses, mask)
        assert logprobs.shape == (3, width_r)
        (torch.where(mask, logprobs, 0.0) * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        expected_grads = None
        double = AutoModelForCausalLM.from_pretrained(model_dir).double()
        total = 0
        for i, (p, r) in enumerate(rows):
            logits = double(input_ids=torch.cat([p, r])[None]).logits[0, len(p) - 1:-1]
            expected = torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0]
            torch.testing.assert_close(logprobs[i, :len(r)].double(), expected.detach(),
                                       rtol=1e-4, atol=1e-5)
            total = total + (expected * upstream[i, :len(r)].double()).sum()
        total.backward()
        expected_grads = {n: q.grad for n, q in double.named_parameters() if q.grad is not None}
        assert set(grads) == set(expected_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad.double(), expected_grads[name], rtol=1e-3, atol=1e-5,
                                       msg=name)


def test_tokenization_follows_trl(tokenizer, tmp_path):
    from pyalign.data import PAD, load_rows, tokenize_rows
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = [{"prompt": "the cat sat", "chosen": " on the mat", "rejected": " under a big red log"}]
    data = tokenize_rows(load_rows(write_jsonl(tmp_path / "s.jsonl", rows)), tokenizer, kind="preference")
    prompt = [bos] + ids("the cat sat")
    assert data.prompts[0].tolist() == prompt
    chosen, rejected = ids(" on the mat") + [eos], ids(" under a big red log") + [eos]
    assert data.completions["rejected"][0].tolist() == rejected
    assert data.completions["chosen"][0].tolist() == chosen + [PAD] * (len(rejected) - len(chosen))
    # implicit prompt: the shared beginning, the space before the split going to the completions
    implicit = [{"chosen": "the cat sat on the mat", "rejected": "the cat sat under a big red log"}]
    data = tokenize_rows(load_rows(write_jsonl(tmp_path / "i.jsonl", implicit)), tokenizer, kind="preference")
    assert data.prompts[0].tolist() == prompt
    assert data.completions["rejected"][0].tolist() == rejected
    # truncation: the prompt from the left, the completion from the right
    data = tokenize_rows(load_rows(write_jsonl(tmp_path / "s2.jsonl", rows)), tokenizer,
                         kind="preference", max_prompt_length=2, max_length=4)
    assert data.prompts[0].tolist() == prompt[-2:]
    assert data.completions["rejected"][0].tolist() == rejected[:2]
    # conversational: the chat template, the prompt with the generation prompt
    messages = [{"prompt": [{"role": "user", "content": "hi"}],
                 "chosen": [{"role": "assistant", "content": "yes"}],
                 "rejected": [{"role": "assistant", "content": "no"}]}]
    data = tokenize_rows(load_rows(write_jsonl(tmp_path / "c.jsonl", messages)), tokenizer, kind="preference")
    assert data.conversational
    assert data.prompts[0].tolist() == ids("<|user|>hi<|end|><|assistant|>")
    # each completion is the rest of the rendered prompt + completion (no eos: the template ends it)
    chosen, rejected = ids("yes<|end|>"), ids("no<|end|>")
    width = max(len(chosen), len(rejected))
    assert data.completions["chosen"][0].tolist() == chosen + [PAD] * (width - len(chosen))
    assert data.completions["rejected"][0].tolist() == rejected + [PAD] * (width - len(rejected))


def test_every_input_format_loads_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed ([data] extra)")

    from pyalign.data import load_rows
    rows = preference_rows(5, conversational=True)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d-dir"))
    for name in ("d.jsonl", "d.json", "d.parquet", "d-dir"):
        assert load_rows(str(tmp_path / name)).records == rows, name


def test_generation_is_a_function_of_the_generator_and_pads_after_eos(model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from pyalign.data import PAD, DatasetTask, load_rows, tokenize_rows
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    data = tokenize_rows(load_rows(write_jsonl(tmp_path / "p.jsonl", preference_rows(6))),
                         tokenizer, kind="prompt")
    task = DatasetTask(tokenizer, data, max_completion_length=12)
    prompts = task.prompts(5, torch.Generator().manual_seed(3))
    assert torch.equal(prompts, task.prompts(5, torch.Generator().manual_seed(3)))
    first = task.generate(model, prompts, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, task.generate(model, prompts, generator=torch.Generator().manual_seed(7)))
    # a model that samples eos often: each row is padded after its first eos
    class LikesEos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **inputs):
            out = self.inner(**inputs)
            out.logits[..., task.eos_id] = out.logits.amax(-1) + 6.0  # p(eos) about 1/2
            return out

    sampled = task.generate(LikesEos(), prompts, generator=torch.Generator().manual_seed(7))
    assert sampled.shape == (5, 12) and (sampled == PAD).any()
    for row in sampled:
        hits = (row == task.eos_id).nonzero()
        assert hits.numel(), row
        assert (row[int(hits[0]) + 1:] == PAD).all()
        assert (row[:int(hits[0]) + 1] >= 0).all()


# -- bad data -----------------------------------------------------------------------------------

def _lines(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _bad_cases(tmp_path, model_dir, tokenizer):
    good = preference_rows(4)
    no_template = tmp_path / "no-template"
    save_tiny_model(no_template, "llama")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        if (no_template / extra).exists():
            (no_template / extra).unlink()
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in os.listdir(model_dir):
        if name.startswith(("config", "model", "generation")):
            os.link(os.path.join(model_dir, name), no_tokenizer / name)
    long_row = dict(good[0], prompt=" ".join(["cat"] * 200))
    (tmp_path / "empty.jsonl").write_text("\n")
    latin = json.dumps(good[:2], indent=1).replace(good[1]["prompt"], "caf\xe9 au lait")
    latin_line = next(i for i, line in enumerate(latin.splitlines(), 1) if "caf" in line)
    return {
        "missing column": ("dpo", [good[0], {"prompt": "a", "chosen": " b"}, good[1]],
                           model_dir, "line 2: missing column(s) 'rejected'"),
        "empty file": ("dpo", None, model_dir, "empty (no rows)"),
        "wrong type": ("dpo", [good[0], good[1], dict(good[2], chosen=3)], model_dir,
                       "line 3: column 'chosen' must be a string or a non-empty list"),
        "bad label": ("kto", [dict(r, label="yes") for r in unpaired_rows(2)], model_dir,
                      "line 1: column 'label' must be true or false"),
        "too long": ("dpo", [good[0], good[1], good[2], long_row], model_dir,
                     "line 4: the prompt has"),
        "no chat template": ("dpo", preference_rows(4, conversational=True), str(no_template),
                             "needs a tokenizer with a chat template"),
        "no tokenizer": ("dpo", good, str(no_tokenizer), "no tokenizer could be loaded"),
        "prompt-only for dpo": ("dpo", [{"prompt": r["prompt"]} for r in good], model_dir,
                                "line 1: this algorithm needs preference data"),
        "prompts for kto": ("kto", [{"prompt": r["prompt"]} for r in good], model_dir,
                            "line 1: this algorithm needs unpaired data"),
        "invalid json": ("dpo", "bad", model_dir, "line 2: invalid JSON"),
        # a file in another encoding, JSONL and JSON: the line of the first bad byte
        "latin-1 jsonl": ("dpo", (".jsonl", _lines(good[:1]) + '{"prompt": "caf\xe9", "chosen": " a", '
                                  '"rejected": " b"}\n'.encode("latin-1")), model_dir,
                          "line 2: not UTF-8 text"),
        "latin-1 json": ("dpo", (".json", latin.encode("latin-1")), model_dir,
                         f"line {latin_line}: not UTF-8 text (invalid continuation byte: byte e9"),
        # JSON's escapes can spell half a surrogate pair, which is no text
        "lone surrogate": ("dpo", [good[0], dict(good[1], prompt="a \ud800 b")], model_dir,
                           "line 2: column 'prompt' holds a lone surrogate (U+D800 at character 3)"),
        "surrogate in a message": ("dpo", [preference_rows(1, conversational=True)[0],
                                           preference_rows(1, conversational=True)[0]
                                           | {"chosen": [{"role": "assistant", "content": "\udfff"}]}],
                                   model_dir, "line 2: column 'chosen' message 0 content holds a lone"),
        # the types of every row, whatever the first row holds (implicit prompt on line 1)
        "later row type": ("dpo", [{"chosen": "a b", "rejected": "a c"},
                                   {"prompt": 5, "chosen": " b", "rejected": " c"}], model_dir,
                           "line 2: column 'prompt' must be a string"),
        "first row lacks rejected": ("dpo", [{"prompt": "a", "chosen": " b"}, good[1]], model_dir,
                                     "line 1: this algorithm needs preference data"),
    }


def test_bad_data_is_reported_with_file_and_row_before_training(tmp_path, model_dir, tokenizer, capsys):
    for name, (algo, rows, model, message) in _bad_cases(tmp_path, model_dir, tokenizer).items():
        path = tmp_path / f"{name.replace(' ', '-')}.jsonl"
        if rows is None:
            path = tmp_path / "empty.jsonl"
        elif rows == "bad":
            path.write_text(json.dumps(preference_rows(1)[0]) + "\n{not json\n")
        elif isinstance(rows, tuple):  # (suffix, the file's bytes)
            path = path.with_suffix(rows[0])
            path.write_bytes(rows[1])
        else:
            write_jsonl(path, rows)
        out = tmp_path / "runs" / name.replace(" ", "-")
        assert train(tmp_path, "--algo", algo, "--model", model, "--data", path, "--out", out,
                     *SMALL, batch_size=1, micro_batch_size=1) == 2, name
        err = capsys.readouterr().err
        named = f"--model {model}" if name == "no tokenizer" else str(path)  # what is wrong
        assert f"pyalign train: error: {named}" in err and message in err, (name, err)
        assert not os.path.exists(out / "metrics.jsonl"), name  # nothing was trained


def test_config_errors_of_the_data_keys(tmp_path, model_dir, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(4))
    (tmp_path / "bad_rewards.py").write_text(
        "def one_short(prompts, completions):\n    return [1.0] * (len(completions) - 1)\n"
        "def raises(prompts, completions):\n    raise KeyError('score')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rl = ("--algo", "rloo", "--model", model_dir, "--data", data, "--reward")
    cases = {
        (*rl, "bad_rewards:one_short"): "--reward bad_rewards:one_short: returned 1 rewards for 2",
        (*rl, "bad_rewards:raises"): "--reward failed on the first prompts of",
        (*rl, "bad_rewards:missing"): "--reward bad_rewards:missing: bad_rewards has no function",
        ("--algo", "rloo", "--model", model_dir, "--data", data): "needs --reward",
        ("--algo", "dpo", "--data", data): "--data needs --model",
        ("--algo", "dpo", "--model", model_dir, "--data", data, "--reward", "m:f"):
            "--reward is for the RL algorithms",
        ("--algo", "dpo", "--reward", "m:f"): "key 'reward' needs --data",
        ("--algo", "dpo", "--model", model_dir, "--data", data, "--max-length", "0"):
            "key 'max_length' must be an int >= 1",
        ("--algo", "dpo", "--model", model_dir, "--data", data, "--max-length", "4096"):
            "more than the model's 128 positions",
        ("--algo", "rloo", "--model", model_dir, "--data", data, "--reward", "no_such_module:f"):
            "--reward no_such_module:f: cannot import",
    }
    for argv, message in cases.items():
        assert train(tmp_path, *argv, "--out", tmp_path / "run", *SMALL, batch_size=2,
                     micro_batch_size=1) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    # the data keys are config-file keys too, and --print-config lists them
    from pyalign.cli.train import main
    config = write_config(tmp_path / "data.toml", model=model_dir, data=data, max_length=64,
                          max_prompt_length=16, max_completion_length=8, per_device_batch_size=4)
    assert main(["--algo", "dpo", "--config", config, "--print-config"]) == 0
    printed = capsys.readouterr().out
    for line in (f"data = {json.dumps(data)}", "max_length = 64", "max_prompt_length = 16",
                 "max_completion_length = 8", "# eval_data =   (not set)", "# reward =   (not set)"):
        assert line in printed


# -- end to end ---------------------------------------------------------------------------------

REWARD_MODULE = '''
def length_reward(prompts, completions, **kwargs):
    """One float per completion: its length in words (a stand-in for a real reward)."""
    return [float(len((c if isinstance(c, str) else c[0]["content"]).split())) for c in completions]
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:length_reward"


def _reward_model_dir(path):
    from transformers import LlamaForSequenceClassification

    from hf_models import tiny_config
    tokenizer = train_tokenizer()
    torch.manual_seed(5)
    config = tiny_config("llama", len(tokenizer))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_dpo_standard_jsonl_subprocess_and_tr_dpo_conversational(tmp_path, model_dir):
    standard = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12))
    settings = write_config(tmp_path / "small.toml", **SMALL_CONFIG)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pyalign.cli", "train", "--algo", "dpo", "--model",
                           model_dir, "--data", standard, "--config", settings, "--out",
                           str(tmp_path / "dpo"), *SMALL], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no reward_vs_kl.png" in done.stderr  # no gold or proxy reward: the plot is skipped
    dpo = records(tmp_path / "dpo")
    assert [r["step"] for r in dpo] == [1, 2, 3, 3]
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "kl_to_init",
                "sample_entropy"):
        assert key in dpo[-2], key
    assert "gold_reward" not in dpo[-2] and "proxy_reward" not in dpo[-2]
    assert len({r["loss"] for r in dpo[:3]}) == 3  # it trained
    # conversational and implicit-prompt data, trust region
    conversational = write_jsonl(tmp_path / "chat.jsonl", preference_rows(12, conversational=True,
                                                                          implicit=True))
    assert train(tmp_path, "--algo", "tr-dpo", "--model", model_dir, "--data", conversational,
                 "--out", tmp_path / "tr-dpo", *SMALL, tr_tau=2) == 0
    tr = records(tmp_path / "tr-dpo")
    assert [r["reference_updated"] for r in tr[:3]] == [False, True, False]


@pytest.mark.slow
def test_kto_unpaired_parquet_and_datasets_dir(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed ([data] extra)")
    rows = unpaired_rows(12)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "kto.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "kto-dir"))
    runs = {}
    for name in ("kto.parquet", "kto-dir"):
        out = tmp_path / ("run-" + name)
        assert train(tmp_path, "--algo", "kto", "--model", model_dir, "--data", tmp_path / name,
                     "--out", out, *SMALL, eval_every=0) == 0
        runs[name] = records(out)
    assert runs["kto.parquet"] == runs["kto-dir"]  # the same rows, the same run
    first = runs["kto.parquet"][0]
    for key in ("loss", "kto_kl", "desirable_reward", "undesirable_reward"):
        assert key in first
    # preference pairs: each a desirable and an undesirable row (TRL's unpairing)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(6))
    assert train(tmp_path, "--algo", "kto", "--model", model_dir, "--data", pairs, "--out",
                 tmp_path / "run-pairs", *SMALL, eval_every=0) == 0
    paired = records(tmp_path / "run-pairs")
    assert all(r["desirable_reward"] != 0 or r["step"] == 1 for r in paired[:3])
    from pyalign.trainers import load_checkpoint
    stored = load_checkpoint(str(tmp_path / "run-pairs" / "checkpoints" / "step-000003.pt"))
    assert stored["config"]["num_examples"] == 12


def test_resume_refuses_other_data_tokenizer_or_reward_files(tmp_path, model_dir, capsys):
    """The checkpoint stores what the run's files held: a data file rewritten with other rows of
    the same length, or another tokenizer in the model directory, is refused by name."""
    import shutil
    model = shutil.copytree(model_dir, tmp_path / "model")
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, preference_rows(4))
    out = tmp_path / "run"
    flags = ("--algo", "dpo", "--model", model, "--data", data, "--out", out, "--no-progress")
    assert train(tmp_path, *flags, "--steps", 1, batch_size=2, micro_batch_size=2, eval_every=0) == 0
    from pyalign.cli.train import main
    resume = ["--out", str(out), "--resume", "--steps", "2", "--no-progress"]  # the stored settings
    write_jsonl(data, preference_rows(4, seed=9))
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"key 'data': the content of {data} is not what the run trained on" in err, err
    write_jsonl(data, preference_rows(4))
    original = (model / "tokenizer_config.json").read_bytes()
    (model / "tokenizer_config.json").write_text(json.dumps(dict(json.loads(original),
                                                                 model_max_length=77)))
    assert main(resume) == 2
    assert f"key 'tokenizer': the tokenizer of {model} is not" in capsys.readouterr().err
    (model / "tokenizer_config.json").write_bytes(original)
    assert main(resume) == 0


def _png_text(path) -> dict:
    from PIL import Image
    with Image.open(path) as image:
        return dict(image.text)


@pytest.mark.slow
def test_rl_with_a_reward_function_and_with_a_reward_model(tmp_path, model_dir, monkeypatch):
    """GRPO with --reward FILE.py:function (a file of the working directory), Elastic Reset on
    GRPO with a reward-model directory: the reward is the proxy reward, the only one, and the
    plot says which reward it shows."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(8)])
    assert train(tmp_path, "--algo", "grpo", "--model", model_dir, "--data", prompts, "--reward",
                 "my_rewards.py:length_reward", "--out", tmp_path / "grpo", *SMALL,
                 samples_per_prompt=2, batch_size=2, micro_batch_size=2, eval_every=0) == 0
    grpo = records(tmp_path / "grpo")
    # the reward function's score (words per completion) is the proxy reward, the only reward
    assert all(r["proxy_reward"] >= 1 for r in grpo[:3]) and "gold_reward" not in grpo[0]
    text = _png_text(tmp_path / "grpo" / "reward_vs_kl.png")
    assert text["Title"] == "grpo: reward vs KL to the initial model"
    assert "y: reward (--reward my_rewards.py:length_reward)" in text["Description"]
    reward_dir = _reward_model_dir(tmp_path / "rm")
    chat = write_jsonl(tmp_path / "chat.jsonl",
                       [{"prompt": r["prompt"]} for r in preference_rows(8, conversational=True)])
    assert train(tmp_path, "--algo", "elastic-reset", "--adv-estimator", "grpo", "--model", model_dir,
                 "--data", chat, "--reward", reward_dir, "--out", tmp_path / "er", *SMALL,
                 samples_per_prompt=2, batch_size=2, micro_batch_size=2, er_reset_every=2,
                 eval_every=0) == 0
    er = records(tmp_path / "er")
    assert [r["reset"] for r in er[:3]] == [False, True, False]
    assert len({r["proxy_reward"] for r in er[:3]}) == 3  # a reward model's real scores
    assert f"y: reward model score (--reward {reward_dir})" in \
        _png_text(tmp_path / "er" / "reward_vs_kl.png")["Description"]


NAN_REWARD = """
calls = 0


def score(prompts, completions, **kwargs):
    # called once before training, then once a step: the second completion of step 2 is NaN
    global calls
    calls += 1
    return [float("nan") if calls == 3 and i == 1 else 1.0 for i in range(len(completions))]
"""


def test_a_non_finite_reward_stops_the_run_before_the_step(tmp_path, model_dir, capsys, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(NAN_REWARD)
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(4)])
    out = tmp_path / "run"
    assert train(tmp_path, "--algo", "rloo", "--model", model_dir, "--data", prompts, "--reward",
                 "nan_reward:score", "--out", out, "--steps", 4, "--no-progress", samples_per_prompt=2,
                 batch_size=2, micro_batch_size=2, eval_every=0, checkpoint_every=1) == 2
    err = capsys.readouterr().err
    assert "--reward nan_reward:score returned nan for a completion of step 2" in err, err
    assert os.listdir(out / "checkpoints") == ["step-000001.pt"]  # step 2 was never applied
    assert [r["step"] for r in records(out)] == [1]
    from pyalign.trainers import load_checkpoint
    policy = load_checkpoint(str(out / "checkpoints" / "step-000001.pt"))["policy"]
    assert all(torch.isfinite(tensor).all() for tensor in policy.values())


def test_reward_specs_a_file_or_a_module_of_the_working_directory(tmp_path, monkeypatch):
    from pyalign.data.rewards import RewardError, load_reward
    (tmp_path / "workdir_reward.py").write_text(REWARD_MODULE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested_reward.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "workdir_reward", raising=False)
    for spec in ("workdir_reward:length_reward", "workdir_reward.py:length_reward",
                 "sub/nested_reward.py:length_reward", f"{tmp_path}/workdir_reward.py:length_reward"):
        assert load_reward(spec, conversational=False)(["p", "q"], ["a b", "c"]) == [2.0, 1.0], spec
    for spec, message in (("missing.py:f", "no such file missing.py"),
                          ("workdir_reward.py:nope", "workdir_reward.py has no function 'nope'"),
                          ("no_such_module:f", "cannot import no_such_module"), ("score", "expected")):
        with pytest.raises(RewardError, match=message):
            load_reward(spec, conversational=False)
    assert str(tmp_path) not in sys.path  # the working directory was on the path for the import only


def test_kto_on_pairs_unpairs_them_as_trl_does(tokenizer, tmp_path):
    Dataset = pytest.importorskip("datasets", reason="datasets is not installed ([test] extra)").Dataset
    unpair_preference_dataset = pytest.importorskip(
        "trl.data_utils", reason="trl is not installed ([test] extra)").unpair_preference_dataset

    from pyalign.data import load_rows, tokenize_rows
    from pyalign.data.loading import example_count, unpair
    rows = preference_rows(5)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    expected = unpair_preference_dataset(Dataset.from_list(rows)).to_list()
    loaded = load_rows(path)
    assert unpair(loaded).records == expected and example_count(loaded, "unpaired") == 10
    assert unpair(loaded).numbers == [1, 2, 3, 4, 5] * 2  # each row named by its pair's line
    data = tokenize_rows(loaded, tokenizer, kind="unpaired")
    assert data.labels.tolist() == [True] * 5 + [False] * 5
    ids = tokenizer(rows[2]["rejected"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert data.completions["completion"][7][:len(ids)].tolist() == ids


@pytest.mark.slow
def test_resume_of_a_user_data_run_gives_the_same_numbers(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12, conversational=True))
    common = ("--algo", "tr-dpo", "--model", model_dir, "--data", data, "--no-progress")
    # a constant learning rate: TRL's linear decay would end the 2-step run at a lower lr than
    # the 4-step run has at step 2 (the run that the resume extends is another schedule)
    extra = dict(tr_tau=2, eval_every=2, lr_scheduler_type="constant")
    assert train(tmp_path, *common, "--steps", 4, "--out", tmp_path / "straight", **extra) == 0
    assert train(tmp_path, *common, "--steps", 2, "--out", tmp_path / "pieces", **extra) == 0
    assert train(tmp_path, *common, "--steps", 4, "--out", tmp_path / "pieces", "--resume", **extra) == 0
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "pieces")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 4]
    assert resumed == straight


@pytest.mark.slow
def test_torchrun_two_processes_on_user_data(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    values = dict(SMALL_CONFIG, algo="tr-dpo", model=model_dir, data=data, steps=3, tr_tau=2,
                  eval_every=0)
    config = write_config(tmp_path / "tr-dpo.toml", **values)
    run_torchrun(os.path.join(REPO, "tests", "trainers", "dist_worker.py"), tmp_path / "two", config)
    assert train(tmp_path, "--config", config, "--out", tmp_path / "one", "--no-progress") == 0
    one, two = records(tmp_path / "one"), records(tmp_path / "two" / "tr-dpo")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "chosen_reward", "rejected_reward", "margin", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=2e-6), (a["step"], key)


@pytest.mark.slow
def test_lora_tr_dpo_on_user_data_then_export_round_trips(tmp_path, model_dir):
    """The README's path with --lora: TR-DPO on the user's model and data trains only the
    adapter, and `pyalign export` (merged) gives a from_pretrained model whose logits are the
    trained policy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyalign.cli.export import main as export_main
    from pyalign.cli.export import rebuild_policy
    from pyalign.trainers.checkpoint import list_checkpoints, load_checkpoint
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12))
    run = tmp_path / "lora-tr-dpo"
    assert train(tmp_path, "--algo", "tr-dpo", "--model", model_dir, "--data", data, "--lora",
                 "r=4,alpha=8", "--out", run, *SMALL, tr_tau=2, eval_every=0) == 0
    assert [r["reference_updated"] for r in records(run)[:3]] == [False, True, False]
    _, newest = list_checkpoints(str(run / "checkpoints"))[-1]
    payload = load_checkpoint(newest)
    assert payload["run"]["lora"]["r"] == 4 and payload["run"]["data"] == data
    policy = rebuild_policy(payload, newest).merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for name, tensor in base.state_dict().items():  # only the adapter trained: merged weights moved
        if name.endswith("q_proj.weight"):
            assert not torch.equal(policy.state_dict()[name], tensor), name
    assert export_main([str(run), "--out", str(tmp_path / "exported"), "--lora-mode", "merged"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = tokenizer([preference_rows(1)[0]["prompt"]], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)
