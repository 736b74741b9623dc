"""The vocab-parallel head (``process_group=``, pyalign/ops/_vocab_parallel.py) with real gloo
ranks: 2 and 3 processes, each holding uneven rows of a V = 37 head and of a V = 203 head whose
shards are wider than the Triton tiles (vocab_parallel_worker.py), every linear_logprobs backend
of the CPU. Each rank's per-token outputs (log-probs, entropy, the
three metrics) and gradients (hidden, its weight and bias rows) equal the float64 oracle of the
whole head, with softcap, logit scale, temperature, ignore_index and kept rows; the fused DPO,
WPO (recompute path) and KTO losses equal the unsharded single-process result; bad input raises
on every rank, also where only one rank's input is bad (no rank left waiting in a collective).
One spawn per world size runs every case."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign import backends
from support import grads64, head_logits64, head_outputs64

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vocab_parallel_worker as worker  # noqa: E402


def run_ranks(tmp_path, world, names):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")])))
    init_file = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(HERE / "vocab_parallel_worker.py"), str(init_file),
                               str(rank), str(world), str(tmp_path / f"rank{rank}.pt"), ",".join(names)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def token_oracle(data, options, with_bias, ignore_index, labels, head_key=""):
    """float64 outputs of the whole head (``data[head_key + "weight"]``, its bias) and the
    gradients of the per-token objective."""
    head = {key: options[key] for key in ("softcap", "logit_scale", "temperature") if key in options}
    valid = labels.reshape(-1) != ignore_index
    # the padded (NaN) row is ignored: it contributes nothing, so the oracle reads it as 0
    hidden = torch.where(valid[:, None], data["hidden"].reshape(-1, worker.HIDDEN), 0.0)
    weight, bias = data[head_key + "weight"], data[head_key + "bias"] if with_bias else None
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    outputs = head_outputs64(head_logits64(hidden, weight, bias, **head), labels.reshape(-1),
                             ignore_index)

    def objective(h, w, b=None):
        out = head_outputs64(head_logits64(h, w, b, **head), labels.reshape(-1), ignore_index)
        return ((out["log_probs"] * data["grad_logprobs"].reshape(-1).double()).sum()
                + (out["entropy"] * data["grad_entropy"].reshape(-1).double()).sum())

    _, grads = grads64(objective, inputs)
    return outputs, grads


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=atol)


def close_gradient(actual, expected, atol=1e-5):
    """A gradient: each element is a sum of fp32 products over tokens (or vocabulary columns),
    whose rounding scales with the largest of them, not with the element itself: ``atol``
    relative to the gradient's largest magnitude (as test_linear_logprobs.py does)."""
    close(actual, expected, atol=atol * max(1.0, float(expected.double().abs().max())))


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_equals_the_whole_head(tmp_path, world):
    names = backends.available("linear_logprobs", "cpu")
    with torch.device("cpu"):  # the ranks run on CPU (gloo), whatever the test device
        results = run_ranks(tmp_path, world, names)
        data = worker.build_cases()
        top1_seen = set()
        cases = [(case, "", worker.SHARDS) for case in worker.TOKEN_CASES]
        cases += [(case, "wide_", worker.WIDE_SHARDS) for case in worker.WIDE_TOKEN_CASES]
        for (name, options, with_bias, ignore_index), head_key, shards in cases:
            labels = results[0]["tokens"][name, names[0]]["labels"]
            expected, grads = token_oracle(data, options, with_bias, ignore_index, labels, head_key)
            for rank, result in enumerate(results):
                rows = worker.shard_rows(world, rank, shards)
                for backend in names:
                    got = result["tokens"][name, backend]
                    for output, value in got.items():
                        if output in ("labels",) or output.startswith("grad_"):
                            continue
                        if output == "is_top1":
                            assert torch.equal(value.reshape(-1), expected["is_top1"]), (name, backend)
                            top1_seen.update(value.reshape(-1).tolist())
                        else:
                            close(value.reshape(-1), expected[output])
                    # a sum over the ranks' shards of fp32 products (for shards within one
                    # tile: a Triton forward's kept rows, then an eager backward)
                    close_gradient(got["grad_hidden"].reshape(-1, worker.HIDDEN), grads[0],
                                   atol=3e-5)
                    close_gradient(got["grad_weight"], grads[1][rows])
                    if with_bias:
                        close_gradient(got["grad_bias"], grads[2][rows])
        assert top1_seen == {True, False}
        # the tie between rows 3 (rank 0) and 34 (the last rank): the first maximum is row 3
        tie = head_outputs64(head_logits64(data["hidden"][0, :2], data["weight"], data["bias"],
                                           temperature=0.7), torch.tensor([3, 34]))["is_top1"]
        assert tie.tolist() == [True, False]

        for backend in names:
            for case, expected in single_process_losses(data, backend).items():
                for rank, result in enumerate(results):
                    rows = worker.shard_rows(world, rank)
                    got = result["losses"][backend][case]
                    close(got["loss"], expected["loss"])
                    for value, want in zip(got["metrics"], expected["metrics"], strict=True):
                        close(value, want)
                    close_gradient(got["grad_hidden"], expected["grad_hidden"])
                    close_gradient(got["grad_weight"], expected["grad_weight"][rows])
                    close_gradient(got["grad_bias"], expected["grad_bias"][rows])

        for result in results:
            errors = result["errors"]
            assert f"outside [0, {worker.VOCAB})" in errors["label_past_vocabulary"]
            assert f"rows per rank: {list(worker.SHARDS[world])}" in errors["label_past_vocabulary"]
            assert "same shape on every rank" in errors["hidden_shapes_differ"]
            assert errors["not_a_group"].startswith("TypeError: process_group must be a torch.distributed")
            assert "vocab_process_group" in errors["kto_label_past_vocabulary"]
            assert "label -3 is outside [0, 37)" in errors["negative_label"]
            assert "label 37 is outside [0, 37)" in errors["label_past_vocabulary_on_rank_0"]
        last = world - 1
        one_rank_cases = {  # case: (the failing rank, the start of its own error)
            "dtype_on_rank_1": (1, "TypeError: hidden and weight must share a dtype"),
            "policy_temperature_on_last_rank": (last, "ValueError: temperature"),
            "dpo_ref_weight_missing_on_rank_0": (0, "ValueError: ref_hidden given without ref_weight"),
            "kto_desirable_shape_on_rank_1": (1, "ValueError: desirable"),
        }
        for case, (failing, own_error) in one_rank_cases.items():
            for rank, result in enumerate(results):
                error = result["errors"][case]
                if rank == failing:
                    assert error.startswith(own_error), (case, error)
                else:
                    assert error.startswith(f"RuntimeError: the inputs of this vocab-parallel call "
                                            f"failed their checks on rank(s) [{failing}]"), (case, error)


def single_process_losses(data, backend):
    """The unsharded losses of the worker's loss cases, in this process."""
    heads = (data["weight"], data["bias"], data["ref_weight"], data["ref_bias"])
    return worker.loss_cases(data, heads, backend, None)


def test_process_group_needs_an_initialised_torch_distributed():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="process_group is given but torch.distributed is not "
                                           "initialised"):
        pyalign.linear_token_logprobs(hidden, weight, torch.tensor([0, 1, 4]), process_group=object())
    with pytest.raises(RuntimeError, match="vocab_process_group is given"):
        pyalign.linear_kto_loss(hidden[None], weight, torch.tensor([[0, 1, 4]]), torch.tensor([True]),
                                ref_logps=torch.zeros(1), kl=torch.zeros(()),
                                vocab_process_group=object())
