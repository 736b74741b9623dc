"""The vocab-parallel head (``process_group=``, pyalign/ops/_vocab_parallel.py) with real gloo
ranks: 2 and 3 processes, each holding uneven rows of a V = 37 head and of a V = 203 head whose
shards are wider than the Triton tiles (vocab_parallel_worker.py), every linear_logprobs backend
of the CPU. Each rank's per-token outputs (log-probs, entropy, the three metrics) equal the
float64 oracle of the whole head, with softcap, logit scale, temperature, ignore_index, kept
rows and the fp32 head of a bf16 hidden state; its gradients (hidden, its weight and bias rows)
are within the fp32 error bounds of the whole head's (support.head_gradient_bounds64: sums of
fp32 products err in proportion to the sum of their magnitudes, not to the result); the fused
DPO (also with an fp32 head), WPO (recompute path), KTO and GRPO losses equal the unsharded
single-process result, their gradients within twice those bounds for the losses' own per-token
coefficients; bad input raises on every rank, also where only one rank's input is bad, and ranks
that ask for different outputs, paths or heads, or pass different labels, all raise the same
error (no rank left waiting in a collective, none aborted by gloo). One spawn per world size runs
every case."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign import backends
from pyalign.ops import _fused_head, kto, linear_policy, linear_preference
from support import (
    WEIGHT_ROUNDING,
    assert_within_bound,
    grads64,
    head_gradient_bounds64,
    head_logits64,
    head_outputs64,
)

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


def token_oracle(data, options, with_bias, ignore_index, labels, head_key="",
                 dtypes=(torch.float32, torch.float32)):
    """float64 outputs of the whole head (``data[head_key + "weight"]``, its bias; the inputs in
    ``dtypes``, hidden's and the head's), the gradients of the per-token objective and their
    fp32 error bounds."""
    head = {key: options[key] for key in ("softcap", "logit_scale", "temperature") if key in options}
    valid = labels.reshape(-1) != ignore_index
    # the padded (NaN) row is ignored: it contributes nothing, so the oracle reads it as 0
    hidden = torch.where(valid[:, None], data["hidden"].reshape(-1, worker.HIDDEN), 0.0).to(dtypes[0])
    weight = data[head_key + "weight"].to(dtypes[1])
    bias = data[head_key + "bias"].to(dtypes[1]) if with_bias else None
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    outputs = head_outputs64(head_logits64(hidden, weight, bias, **head), labels.reshape(-1),
                             ignore_index)
    entropy = "entropy" in options.get("outputs", ()) or options.get("entropy", False)
    upstream = (data["grad_logprobs"], data["grad_entropy"] if entropy else None)

    def objective(h, w, b=None):
        out = head_outputs64(head_logits64(h, w, b, **head), labels.reshape(-1), ignore_index)
        value = (out["log_probs"] * upstream[0].reshape(-1).double()).sum()
        return value if upstream[1] is None else (
            value + (out["entropy"] * upstream[1].reshape(-1).double()).sum())

    _, grads = grads64(objective, inputs)
    bounds = head_gradient_bounds64(hidden, weight, bias, labels, *upstream,
                                    ignore_index=ignore_index, **head)
    return outputs, grads, bounds


def close(actual, expected, atol=1e-5, equal_nan=False):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=atol,
                               equal_nan=equal_nan)


def assert_agrees(actual, expected, bound, name=""):
    """|actual - expected| <= bound, and (bf16 / fp16 gradients) the two roundings of the fp32
    results into actual's dtype."""
    half_ulp = WEIGHT_ROUNDING[actual.dtype] if actual.dtype != torch.float32 else 0.0
    assert_within_bound(actual, expected, bound + half_ulp * expected.double().abs(), name)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_equals_the_whole_head(tmp_path, world):
    names = backends.available("linear_logprobs", "cpu")
    with torch.device("cpu"):  # the ranks run on CPU (gloo), whatever the test device
        results = run_ranks(tmp_path, world, names)
        data = worker.build_cases()
        top1_seen = set()
        fp32 = (torch.float32, torch.float32)
        cases = [(case, "", worker.SHARDS, fp32) for case in worker.TOKEN_CASES]
        cases += [(case, "wide_", worker.WIDE_SHARDS, fp32) for case in worker.WIDE_TOKEN_CASES]
        cases += [(case[:4], "wide_", worker.WIDE_SHARDS, case[4])
                  for case in worker.FP32_HEAD_TOKEN_CASES]
        for (name, options, with_bias, ignore_index), head_key, shards, dtypes in cases:
            labels = results[0]["tokens"][name, names[0]]["labels"]
            expected, grads, bounds = token_oracle(data, options, with_bias, ignore_index, labels,
                                                   head_key, dtypes)
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
                    # sums of fp32 products (hidden's over every rank's shard): within the
                    # fp32 error bound of each element's sum, rounded into the input's dtype
                    assert_within_bound(got["grad_hidden"].reshape(-1, worker.HIDDEN), grads[0],
                                        bounds[0].reshape(-1, worker.HIDDEN), f"{name} hidden")
                    assert_within_bound(got["grad_weight"], grads[1][rows], bounds[1][rows],
                                        f"{name} weight")
                    if with_bias:
                        assert_within_bound(got["grad_bias"], grads[2][rows], bounds[2][rows],
                                            f"{name} bias")
        assert top1_seen == {True, False}
        # the tie between rows 3 (rank 0) and 34 (the last rank): the first maximum is row 3
        tie = head_outputs64(head_logits64(data["hidden"][0, :2], data["weight"], data["bias"],
                                           temperature=0.7), torch.tensor([3, 34]))["is_top1"]
        assert tie.tolist() == [True, False]

        bounds = loss_gradient_bounds(data)
        for backend in names:
            for case, expected in single_process_losses(data, backend).items():
                for rank, result in enumerate(results):
                    rows = worker.shard_rows(world, rank)
                    got = result["losses"][backend][case]
                    close(got["loss"], expected["loss"])
                    for value, want in zip(got["metrics"], expected["metrics"], strict=True):
                        close(value, want, equal_nan=True)  # NaN: a metric without its input
                    bound_hidden, bound_weight, bound_bias = bounds[case]
                    assert_agrees(got["grad_hidden"], expected["grad_hidden"], bound_hidden,
                                  f"{case} hidden")
                    assert_agrees(got["grad_weight"], expected["grad_weight"][rows],
                                  bound_weight[rows], f"{case} weight")
                    assert_agrees(got["grad_bias"], expected["grad_bias"][rows], bound_bias[rows],
                                  f"{case} bias")

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
        disagreements = {  # case: what the ranks disagree on, as every rank says it
            "entropy_on_rank_0": "process_group disagree on entropy:",
            "metrics_on_last_rank": "process_group disagree on entropy, is_top1:",
            "temperature_per_rank": "process_group disagree on temperature:",
            "head_dtype_on_rank_1": "process_group disagree on head_dtype:",
            "gradients_on_rank_0": "process_group disagree on gradients:",
            "labels_differ_on_rank_1": "process_group disagree on labels:",
            "dpo_path_on_rank_0": "process_group disagree on fused:",
            "kto_kl_on_last_rank": "vocab_process_group disagree on kl:",
            "policy_softcap_on_rank_1": "process_group disagree on softcap:",
            "different_ops_on_rank_0": "process_group disagree on op,",
        }
        for case, start in disagreements.items():
            for result in results:
                error = result["errors"][case]
                assert error.startswith(f"ValueError: the ranks of {start}"), (case, error)


def single_process_losses(data, backend):
    """The unsharded losses of the worker's loss cases, in this process."""
    heads = (data["weight"], data["bias"], data["ref_weight"], data["ref_bias"])
    return worker.loss_cases(data, heads, backend, None)


def loss_coefficients(data, dtype):
    """Per loss case of the worker: the head call its gradient flows through (the recompute
    path, unsharded, eager, inputs in ``dtype``; bf16 hidden states stay bf16) as (hidden,
    weight, bias, labels, options, d loss / d log-probs, d loss / d entropies or None)."""
    real, records = linear_preference.linear_token_logprobs, []

    def recorded(hidden, weight, labels, **options):
        out = real(hidden, weight, labels, **options)
        if torch.is_grad_enabled() and hidden.requires_grad:
            outputs = out if isinstance(out, tuple) else (out,)
            for tensor in outputs:
                tensor.retain_grad()
            records.append((hidden, weight, options.get("bias"), labels, options, outputs))
        return out

    def cast(value):
        keep = value.dtype in (torch.bfloat16, torch.float16)
        return value if keep or not value.dtype.is_floating_point else value.to(dtype)

    cast_data = {key: cast(value) for key, value in data.items()}
    heads = tuple(cast_data[key] for key in ("weight", "bias", "ref_weight", "ref_bias"))
    with pytest.MonkeyPatch.context() as patch:
        for module in (linear_preference, kto, linear_policy):
            patch.setattr(module, "linear_token_logprobs", recorded)
        patch.setattr(_fused_head, "applies", lambda *args, **kwargs: False)
        cases = worker.loss_cases(cast_data, heads, "eager", None)
    assert len(records) == len(cases)  # one head call with a gradient per case, in order
    coefficients = {}
    for case, (hidden, weight, bias, labels, options, outputs) in zip(cases, records, strict=True):
        grads = tuple(None if tensor.grad is None else tensor.grad.detach() for tensor in outputs)
        coefficients[case] = (hidden.detach(), weight.detach(), bias, labels, options,
                              grads[0], grads[1] if len(grads) > 1 else None)
    return coefficients


def loss_gradient_bounds(data):
    """Per loss case, bounds on |sharded - unsharded| of its gradients: each fp32 result lies
    within head_gradient_bounds64 of the exact one for the loss's per-token coefficients (float64,
    from the recompute path's head call), those coefficients themselves erring as an fp32
    computation of them does (|fp32 - float64| on the unsharded recompute path, taken twice:
    the other run's own error is of the same kind); the two results, twice that."""
    exact, fp32 = loss_coefficients(data, torch.float64), loss_coefficients(data, torch.float32)
    bounds = {}
    for case, (hidden, weight, bias, labels, options, g, g_ent) in exact.items():
        g32, g_ent32 = fp32[case][5:]

        def error(ours, theirs):
            return None if ours is None else 2 * (ours.double() - theirs.double()).abs()

        head = {key: options[key] for key in ("softcap", "logit_scale", "temperature")
                if options.get(key) is not None}
        bound = head_gradient_bounds64(
            hidden, weight, None if bias is None else bias.detach(), labels, g, g_ent,
            ignore_index=options.get("ignore_index", -100),
            coefficient_errors=(error(g32, g), error(g_ent32, g_ent)), **head)
        bounds[case] = tuple(2 * part for part in bound)
    return bounds


def test_process_group_needs_an_initialised_torch_distributed():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="process_group is given but torch.distributed is not "
                                           "initialised"):
        pyalign.linear_token_logprobs(hidden, weight, torch.tensor([0, 1, 4]), process_group=object())
    with pytest.raises(RuntimeError, match="vocab_process_group is given"):
        pyalign.linear_kto_loss(hidden[None], weight, torch.tensor([[0, 1, 4]]), torch.tensor([True]),
                                ref_logps=torch.zeros(1), kl=torch.zeros(()),
                                vocab_process_group=object())
