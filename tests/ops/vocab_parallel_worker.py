"""One gloo rank of test_vocab_parallel.py (launched as a script):

    python vocab_parallel_worker.py INIT_FILE RANK WORLD OUT BACKEND[,BACKEND...]

Every rank builds the same global data from one seed (``build_cases``, which the test imports
too), keeps its rows of each head (``SHARDS[WORLD]``: uneven, V = 37 not divisible by 2 or 3),
runs every case on every backend with the shard (outputs NaN-poisoned where a kernel writes
them), and saves its outputs and gradients, then the errors of the bad-input cases.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support

import pyalign  # noqa: E402
from support import poisoned_outputs  # noqa: E402

VOCAB, HIDDEN = 37, 16
SHARDS = {2: (21, 16), 3: (16, 8, 13)}
# A second head whose every shard is wider than the Triton tiles (fp32: forward 64, backward 32
# columns), so the kernels stream several tiles of a shard with the whole rows' stats (the shards
# of the first head fit in one tile, whose backward runs eagerly)
WIDE_VOCAB = 203
WIDE_SHARDS = {2: (110, 93), 3: (70, 66, 67)}
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# (name, linear_token_logprobs options): every head option, ignore_index (-100, and 5: a value
# a shard's local label could take), memory_budget's kept rows and small chunks
TOKEN_CASES = (
    ("bias_temperature", dict(temperature=0.7, outputs=ALL_OUTPUTS), True, -100),
    ("softcap_scale", dict(softcap=4.0, logit_scale=0.8, temperature=1.3, outputs=ALL_OUTPUTS),
     True, -100),
    ("kept_rows_chunks_ignore_5", dict(entropy=True, memory_budget=5 * VOCAB * 4, chunk_size=3),
     False, 5),
)
# (name, options, with_bias, ignore_index) on the wide head
WIDE_TOKEN_CASES = (
    ("wide_softcap_temperature", dict(softcap=5.0, temperature=0.8, outputs=ALL_OUTPUTS), True, -100),
)
# The fp32 head (name, options, with_bias, ignore_index, (hidden dtype, head dtype)) on the wide
# head: a bf16 hidden state with the fp32 shards, and bf16 shards upcast by head_dtype
FP32_HEAD_TOKEN_CASES = (
    ("fp32_head_bf16_hidden", dict(temperature=0.9, outputs=ALL_OUTPUTS), True, -100,
     (torch.bfloat16, torch.float32)),
    ("head_dtype_bf16_head", dict(softcap=4.0, head_dtype=torch.float32, entropy=True), True, -100,
     (torch.bfloat16, torch.bfloat16)),
)


def build_cases(seed=0):
    """The global tensors of every case (CPU, fp32): the same on every rank."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    weight = randn(VOCAB, HIDDEN, scale=0.5)
    # rows 3 (first shard) and 34 (last shard) tie as the largest: the first maximum is row 3
    weight[3] *= 4.0
    weight[34] = weight[3]
    bias = randn(VOCAB, scale=0.3)
    bias[34] = bias[3]
    hidden = randn(2, 6, HIDDEN)
    hidden[0, :3] = weight[3]  # rows whose maximum is the tie (labels 3 and 34 below)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    labels[0, 0], labels[0, 1], labels[0, 2] = 3, 34, VOCAB - 1
    labels[1, 1] = 0
    with torch.no_grad():  # a few labels at the row's argmax: is_top1 True there
        argmax = (hidden[1] @ weight.t() + bias).argmax(-1)
    labels[1, 2:4] = argmax[2:4]
    cases = {"weight": weight, "bias": bias, "hidden": hidden, "labels": labels,
             "grad_logprobs": randn(2, 6), "grad_entropy": randn(2, 6)}
    # the fused losses: 2 pairs x T = 5, prompts ignored; KTO: 4 sequences and 3 KL pairs
    pair_labels = torch.randint(0, VOCAB, (4, 5), generator=generator)
    pair_labels[:, :2] = -100
    pair_labels[3, 4] = -100
    cases.update(pair_hidden=randn(4, 5, HIDDEN), pair_labels=pair_labels,
                 ref_weight=weight + randn(VOCAB, HIDDEN, scale=0.05), ref_bias=bias + 0.1,
                 ref_hidden=randn(4, 5, HIDDEN), ref_logps=-20 - 5 * torch.rand(4, generator=generator),
                 desirable=torch.tensor([True, False, True, False]),
                 kl_hidden=randn(3, 5, HIDDEN), kl_labels=pair_labels[:3].roll(1, 1).clamp(min=0),
                 advantages=randn(4), old_token_logps=-3 * torch.rand(4, 5, generator=generator),
                 ref_token_logps=-3 * torch.rand(4, 5, generator=generator))
    wide_labels = torch.randint(0, WIDE_VOCAB, (2, 6), generator=generator)
    wide_labels[0, :3] = torch.tensor([0, WIDE_VOCAB - 1, 109])  # the ends, a shard's last row
    cases.update(wide_weight=randn(WIDE_VOCAB, HIDDEN, scale=0.5), wide_bias=randn(WIDE_VOCAB, scale=0.3),
                 wide_labels=wide_labels)
    return cases


def shard_rows(world, rank, shards=SHARDS):
    sizes = shards[world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def token_case(data, options, with_bias, ignore_index, weight, bias, backend, process_group,
               labels_key="labels", dtypes=(torch.float32, torch.float32)):
    """linear_token_logprobs and its gradients for one case: {output name: value, "grad_*"};
    ``dtypes``: those of hidden and of the head."""
    labels = data[labels_key].clone()
    labels[1, 5] = ignore_index
    labels[1, 0] = 5  # ignored with ignore_index=5, a label otherwise
    hidden = data["hidden"].to(dtypes[0], copy=True)
    hidden[1, 5] = float("nan")  # a padded row: reaches nothing
    hidden.requires_grad_(True)
    weight = weight.detach().to(dtypes[1], copy=True).requires_grad_(True)
    bias = bias.detach().to(dtypes[1], copy=True).requires_grad_(True) if with_bias else None
    with poisoned_outputs():
        out = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias,
                                            ignore_index=ignore_index, backend=backend,
                                            process_group=process_group, **options)
        if isinstance(out, tuple) and not hasattr(out, "_fields"):
            out = dict(log_probs=out[0], entropy=out[1])
        else:
            out = {name: value for name, value in out._asdict().items() if value is not None}
        objective = (out["log_probs"] * data["grad_logprobs"]).sum()
        objective = objective + (out["entropy"] * data["grad_entropy"]).sum()
        objective.backward()
    result = {name: value.detach() for name, value in out.items()}
    result.update(grad_hidden=hidden.grad, grad_weight=weight.grad,
                  grad_bias=None if bias is None else bias.grad, labels=labels)
    return result


def loss_cases(data, heads, backend, process_group):
    """The fused DPO with WPO weights (3 matmuls, reference from hidden states), the same on the
    recompute path (reduction "none", precomputed reference), KTO with KL pairs and GRPO with an
    entropy bonus (3 matmuls): loss and gradients."""
    weight, bias, ref_weight, ref_bias = heads
    results = {}

    def bf16(tensor):
        """A bf16 hidden state: its values in float64 for a float64 head (tests' exact run)."""
        rounded = tensor.to(torch.bfloat16)
        return rounded.double() if weight.dtype == torch.float64 else rounded

    def run(name, call, hidden=None):
        hidden = (data["pair_hidden"].clone() if hidden is None else hidden).requires_grad_(True)
        head = weight.detach().clone().requires_grad_(True)
        head_bias = bias.detach().clone().requires_grad_(True)
        with poisoned_outputs():
            loss, *metrics = call(hidden, head, head_bias)
            loss.sum().backward()
        results[name] = dict(loss=loss.detach(), metrics=[m.detach() for m in metrics],
                             grad_hidden=hidden.grad, grad_weight=head.grad, grad_bias=head_bias.grad)

    run("dpo_fused", lambda hidden, head, head_bias: pyalign.linear_preference_loss(
        hidden, head, data["pair_labels"], bias=head_bias, ref_hidden=data["ref_hidden"],
        ref_weight=ref_weight, ref_bias=ref_bias, beta=0.3, temperature=0.9, chunk_size=4,
        use_weighting=True,
        backend=backend, process_group=process_group))
    run("wpo_recompute", lambda hidden, head, head_bias: pyalign.linear_preference_loss(
        hidden, head, data["pair_labels"], bias=head_bias, ref_logps=data["ref_logps"],
        use_weighting=True, reduction="none", backend=backend, process_group=process_group))
    # ignore_index=5: labels 21, 26 and 29 are local label 5 on some shard (offsets 16, 21, 24)
    kto_labels = data["pair_labels"].where(data["pair_labels"] != -100, 5)
    kto_labels[:3, 2] = torch.tensor([26, 21, 29])
    run("kto_fused", lambda hidden, head, head_bias: pyalign.linear_kto_loss(
        hidden, head, kto_labels, data["desirable"], bias=head_bias, ignore_index=5,
        kl_hidden=data["kl_hidden"], kl_labels=data["kl_labels"], ref_hidden=data["ref_hidden"],
        ref_kl_hidden=data["kl_hidden"], ref_weight=ref_weight, ref_bias=ref_bias, beta=0.2,
        chunk_size=6, backend=backend, vocab_process_group=process_group)[:2])
    # GRPO with the k3 KL and an entropy bonus: the entropy's gradient crosses the shards too
    run("policy_fused", lambda hidden, head, head_bias: pyalign.linear_policy_loss(
        hidden, head, data["pair_labels"], data["advantages"], data["old_token_logps"],
        data["ref_token_logps"], bias=head_bias, beta=0.1, entropy_coef=0.05, temperature=0.9,
        chunk_size=6, backend=backend, process_group=process_group))
    # the fp32 head: a bf16 hidden state with the fp32 head (and the fp32 reference's)
    run("dpo_fp32_head", lambda hidden, head, head_bias: pyalign.linear_preference_loss(
        hidden, head, data["pair_labels"], bias=head_bias, ref_hidden=bf16(data["ref_hidden"]),
        ref_weight=ref_weight, ref_bias=ref_bias, beta=0.3, chunk_size=4, backend=backend,
        process_group=process_group), hidden=bf16(data["pair_hidden"]))
    return results


def error_of(call):
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def bad_input_errors(data, weight, rank):
    """The bad-input cases, each raising on every rank after the one check all-reduce (a rank
    left out of it would wait there for ever: the test's timeout)."""
    hidden, labels = data["hidden"], data["labels"]
    world = dist.group.WORLD
    last = world.size() - 1
    big = labels.clone()
    big[0, 4] = VOCAB  # one past the vocabulary the shards add up to
    negative = labels.clone()
    negative[1, 3] = -3
    other_shape = hidden[:, :5] if rank == 1 else hidden  # rank 1 has fewer tokens
    pair_hidden, pair_labels = data["pair_hidden"], data["pair_labels"]
    return {
        "label_past_vocabulary": error_of(lambda: pyalign.linear_token_logprobs(
            hidden, weight, big, process_group=world)),
        "hidden_shapes_differ": error_of(lambda: pyalign.linear_token_logprobs(
            other_shape, weight, labels[:, :other_shape.shape[1]], process_group=world)),
        "not_a_group": error_of(lambda: pyalign.linear_token_logprobs(
            hidden, weight, labels, process_group="world")),
        "kto_label_past_vocabulary": error_of(lambda: pyalign.linear_kto_loss(
            data["pair_hidden"], weight, big[:, :5].clamp(max=VOCAB).repeat(2, 1),
            data["desirable"], ref_logps=data["ref_logps"], kl=torch.zeros(()),
            vocab_process_group=world)),
        "negative_label": error_of(lambda: pyalign.linear_token_logprobs(
            hidden, weight, negative, process_group=world)),
        # bad on one rank only: that rank raises its own error, every other rank says which failed
        "label_past_vocabulary_on_rank_0": error_of(lambda: pyalign.linear_token_logprobs(
            hidden, weight, big if rank == 0 else labels, process_group=world)),
        "dtype_on_rank_1": error_of(lambda: pyalign.linear_token_logprobs(
            hidden.double() if rank == 1 else hidden, weight, labels, entropy=True,
            process_group=world)),
        "policy_temperature_on_last_rank": error_of(lambda: pyalign.linear_policy_loss(
            pair_hidden, weight, pair_labels, data["advantages"], data["old_token_logps"],
            temperature=0.0 if rank == last else 1.0, process_group=world)),
        "dpo_ref_weight_missing_on_rank_0": error_of(lambda: pyalign.linear_preference_loss(
            pair_hidden, weight, pair_labels, ref_hidden=data["ref_hidden"],
            ref_weight=None if rank == 0 else weight, process_group=world)),
        "kto_desirable_shape_on_rank_1": error_of(lambda: pyalign.linear_kto_loss(
            pair_hidden, weight, pair_labels, data["desirable"][:3] if rank == 1 else data["desirable"],
            ref_logps=data["ref_logps"], kl=torch.zeros(()), vocab_process_group=world)),
        **disagreement_errors(data, weight, rank, last),
    }


def disagreement_errors(data, weight, rank, last):
    """Ranks that ask for different outputs, paths or heads, or pass different labels (each
    would run other collectives than the rest, or exchange other units): every rank raises the
    same ValueError from the one check all-reduce, none crashes in gloo or waits."""
    hidden, labels, world = data["hidden"], data["labels"], dist.group.WORLD
    pair_hidden, pair_labels = data["pair_hidden"], data["pair_labels"]
    other_labels = labels.clone()
    other_labels[0, 3] = (labels[0, 3] + 1) % VOCAB  # in range, but not this rank's label
    policy = (pair_hidden, weight, pair_labels, data["advantages"], data["old_token_logps"])

    def token(**options):
        return error_of(lambda: pyalign.linear_token_logprobs(
            options.pop("hidden", hidden), options.pop("weight", weight), labels,
            process_group=world, **options))

    return {
        "entropy_on_rank_0": token(entropy=rank == 0),
        "metrics_on_last_rank": token(outputs=("is_top1",) if rank == last else ("entropy",)),
        "temperature_per_rank": token(temperature=1.0 + rank / 10),
        "head_dtype_on_rank_1": token(hidden=hidden.bfloat16(), weight=weight.bfloat16(),
                                      head_dtype=torch.float32 if rank == 1 else None),
        "gradients_on_rank_0": token(hidden=hidden.clone().requires_grad_(rank == 0)),
        "labels_differ_on_rank_1": error_of(lambda: pyalign.linear_token_logprobs(
            hidden, weight, other_labels if rank == 1 else labels, process_group=world)),
        "dpo_path_on_rank_0": error_of(lambda: pyalign.linear_preference_loss(
            pair_hidden.clone().requires_grad_(True), weight, pair_labels,
            ref_logps=data["ref_logps"], reduction="mean" if rank == 0 else "none",
            process_group=world)),
        "kto_kl_on_last_rank": error_of(lambda: pyalign.linear_kto_loss(
            pair_hidden, weight, pair_labels, data["desirable"], ref_logps=data["ref_logps"],
            **(dict(kl_hidden=data["kl_hidden"], kl_labels=data["kl_labels"],
                    ref_kl_logps=data["ref_logps"][:3]) if rank == last else dict(kl=torch.zeros(()))),
            vocab_process_group=world)),
        "policy_softcap_on_rank_1": error_of(lambda: pyalign.linear_policy_loss(
            *policy, softcap=30.0 if rank == 1 else None, process_group=world)),
        "different_ops_on_rank_0": error_of(lambda: pyalign.linear_token_logprobs(
            pair_hidden, weight, pair_labels, process_group=world) if rank == 0 else
            pyalign.linear_policy_loss(*policy, process_group=world)),
    }


def main() -> int:
    init_file, rank, world, out, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
        sys.argv[5].split(",")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = build_cases()
    rows = shard_rows(world, rank)
    weight, bias = data["weight"][rows], data["bias"][rows]
    heads = (weight, bias, data["ref_weight"][rows], data["ref_bias"][rows])
    group = dist.group.WORLD
    result = {"tokens": {}, "losses": {}}
    for backend in names:
        for name, options, with_bias, ignore_index in TOKEN_CASES:
            result["tokens"][name, backend] = token_case(data, options, with_bias, ignore_index,
                                                         weight, bias, backend, group)
        wide = shard_rows(world, rank, WIDE_SHARDS)
        for name, options, with_bias, ignore_index in WIDE_TOKEN_CASES:
            result["tokens"][name, backend] = token_case(
                data, options, with_bias, ignore_index, data["wide_weight"][wide],
                data["wide_bias"][wide], backend, group, labels_key="wide_labels")
        for name, options, with_bias, ignore_index, dtypes in FP32_HEAD_TOKEN_CASES:
            result["tokens"][name, backend] = token_case(
                data, options, with_bias, ignore_index, data["wide_weight"][wide],
                data["wide_bias"][wide], backend, group, labels_key="wide_labels", dtypes=dtypes)
        result["losses"][backend] = loss_cases(data, heads, backend, group)
    result["errors"] = bad_input_errors(data, weight, rank)
    torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
