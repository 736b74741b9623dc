"""Helpers of the study tests: the tiny grid, running `pyalign study` in a subprocess."""
import subprocess
import sys

# 2 algorithms x 2 values x 2 evaluations (steps 0 and one epoch), one seed, tiny sizes.
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
