"""Helpers of the study tests: the tiny grid, running `pyalign study` in a subprocess."""
import subprocess
import sys

# 2 algorithms x 2 values x 2 evaluations (steps 0 and one epoch), one seed, tiny sizes, on the
# variable-length task (responses that stop at EOS through sampling, training and evaluation).
TINY_GRID_TOML = """
seeds = [0]
epochs = [1.0]
epoch_prompts = 16
[algos.dpo]
beta = [0.1, 0.4]
[algos.rloo]
kl_coef = [0.0, 0.1]
[preference]
num_examples = 32
batch_size = 8
micro_batch_size = 8
lr = 0.01
[rl]
batch_size = 4
micro_batch_size = 4
lr = 0.01
[task]
variable_length = true
prompt_len = 4
response_len = 6
hidden_size = 32
num_layers = 2
num_heads = 2
intermediate_size = 64
sft_steps = 25
sft_batch = 32
rm_pairs = 200
[eval]
prompts = 32
heldout = 16
"""
POINTS = 4
EVALUATIONS = 2


def run_study_cli(argv, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyalign.cli", "study", *argv, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_csv(out):
    with open(f"{out}/points.csv") as handle:
        return handle.read()


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (Linux: /proc/<pid>/task/*/children)."""
    import glob
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for path in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(path) as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def synthetic_rows(method, *, seeds, hump, values=(0.05, 0.1, 0.2), length_per_nat=0.0, size=None,
                   kl_scale=1.0, noise=0.005, rng_seed=0):
    """Study rows (as a point writes them) whose gold follows R(d) = d(0.3 - 0.2 log d) (a hump
    peaking at d = 1.65) or rises as 0.05 d (none); the proxy rises with d; the length grows by
    ``length_per_nat`` tokens per nat of KL. Each run is evaluated at 0, 1/8 .. 2 epochs."""
    import math

    import numpy as np
    rng = np.random.default_rng(rng_seed)
    rows = []
    for value in values:
        for seed in seeds:
            for step, epoch in enumerate((0.0, 0.125, 0.25, 0.5, 1.0, 2.0)):
                kl = kl_scale * 3.0 * epoch / value
                d = math.sqrt(kl)
                gain = (d * (0.3 - 0.2 * math.log(d)) if hump else 0.05 * d) if d else 0.0
                gain += float(rng.normal(0, noise)) if d else 0.0
                row = {"point_id": f"{method}__beta={value}__seed{seed}", "method": method, "algo": method,
                       "knob": "beta", "value": value, "seed": seed, "step": 8 * step, "epoch": epoch,
                       "kl_to_init": kl, "sqrt_kl": d, "gold_reward": gain, "gold_reward_se": 0.006,
                       "gold_gain": gain, "gold_win_rate": 0.5 + gain / 2, "proxy_reward": 0.1 * d,
                       "response_length": 10 + length_per_nat * kl + float(rng.normal(0, 0.2)),
                       "perplexity": 11.0}
                if size:
                    row["size"] = size
                rows.append(row)
    return rows


GOLD_PY = '''
def score(prompts, completions):
    """A gold reward for the tests: one point per word, minus two per "no"."""
    return [len(c.split()) - 3.0 * c.split().count("no") for c in completions]


def nan(prompts, completions):
    return [float("nan")] * len(completions)


def boom(prompts, completions):
    raise RuntimeError("this gold reward is broken")
'''


def write_user_files(folder):
    """A user's study inputs under ``folder``: a tiny Llama and its tokenizer (``model``), 64
    preference rows (``prefs.jsonl``; the rejected completion ends in "no"), 24 prompt-only rows
    (``prompts.jsonl``), gold reward functions (``gold.py``) and a tiny sequence-classification
    reward model (``rm``); name -> path."""
    import json
    import os
    import random

    import torch
    from transformers import LlamaForSequenceClassification

    from hf_models import sample_text, save_tiny_model, tiny_config, train_tokenizer

    folder = str(folder)
    files = {"model": save_tiny_model(os.path.join(folder, "model"), "llama"),
             "prefs": os.path.join(folder, "prefs.jsonl"), "prompts": os.path.join(folder, "prompts.jsonl"),
             "gold": os.path.join(folder, "gold.py"), "rm": os.path.join(folder, "rm")}
    rng = random.Random(0)
    with open(files["prefs"], "w") as handle:
        for _ in range(64):
            prompt = sample_text(rng, rng.randint(2, 6))
            chosen, rejected = (sample_text(rng, rng.randint(1, 5)) for _ in range(2))
            handle.write(json.dumps({"prompt": prompt, "chosen": " " + chosen,
                                     "rejected": " " + rejected + " no"}) + "\n")
    with open(files["prompts"], "w") as handle:
        for _ in range(24):
            handle.write(json.dumps({"prompt": sample_text(rng, rng.randint(2, 6))}) + "\n")
    with open(files["gold"], "w") as handle:
        handle.write(GOLD_PY)
    tokenizer = train_tokenizer()
    torch.manual_seed(5)
    config = tiny_config("llama", len(tokenizer))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(files["rm"])
    tokenizer.save_pretrained(files["rm"])
    return files
