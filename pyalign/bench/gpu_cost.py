"""The written cost model of pyalign's CUDA paths (docs/gpu.md): FLOPs, HBM bytes, atomic bytes
and launches of each path as formulas of the shapes, and the time they predict from a GPU's peak
numbers. docs/gpu.md's tables are this module's output (``python -m pyalign.bench.gpu_cost``),
and benchmarks/gpu_report.py prints the predictions beside what benchmarks/gpu_check.sh
measured, so a prediction and its measurement meet in one table.

A prediction is a range from two stated sets of assumptions (``OPTIMISTIC``, ``PESSIMISTIC``):
how close the matmuls come to the tensor-core peak, and where the fused kernel's atomic adds are
served (L2 or an HBM read-modify-write). Nothing here is calibrated on a GPU yet: the ranges are
what the formulas say, and the GPU check is what settles them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float       # dense tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    sms: int


H100 = GPU("H100 SXM", 989e12, 3.35e12, 132)
H200 = GPU("H200", 989e12, 4.8e12, 132)
GPUS = (H100, H200)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    name: str
    gemm_efficiency: float    # a large cuBLAS bf16 GEMM, fraction of the peak
    triton_efficiency: float  # tl.dot inside a fused kernel that runs its epilogue in the loop
    l2_atomic_bytes_per_s: float  # fp32 atomic adds into lines that stay in L2
    warm_atomics_in_l2: bool  # whether adds that fit L2 only with a grouped launch order stay there
    launch_s: float           # host + launch cost of one kernel


OPTIMISTIC = Assumptions("optimistic", 0.80, 0.60, 7e12, True, 3e-6)
PESSIMISTIC = Assumptions("pessimistic", 0.65, 0.45, 3e12, False, 6e-6)


class Shape(NamedTuple):
    tokens: int        # N
    hidden: int        # H
    vocab: int         # V
    itemsize: int = 2  # b: bf16


class Cost(NamedTuple):
    """One path at one shape. Matmul phases are bounded by the slower of their FLOPs and their
    own HBM bytes (operands, outputs, fp32 accumulators); streams are memory-bound kernels;
    atomics overlap the matmul phase they belong to."""
    matmul_flops: float      # in the phase the atomics overlap (or all of them)
    matmul_bytes: float      # HBM bytes the matmuls move
    matmul_kind: str         # "gemm" (cuBLAS) or "triton" (tl.dot in a fused kernel)
    stream_bytes: float = 0.0
    # fp32 atomic adds: into lines that stay in L2 by the grid's order ("hot"), that stay there
    # only under the optimistic assumption ("warm"), and whose lines are read and written in HBM
    atomic_bytes_hot: float = 0.0
    atomic_bytes_warm: float = 0.0
    atomic_bytes_cold: float = 0.0
    launches: int = 1
    # a phase without atomics whose grid keeps only ``serial_fill`` of the SMs busy (the fused
    # forward: one program per BLOCK_N rows)
    serial_flops: float = 0.0
    serial_fill: float = 1.0
    # the path's own buffers, beyond inputs, outputs and the fp32 weight gradient every path
    # accumulates (4 V H bytes)
    held_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.serial_flops

    def seconds(self, gpu: GPU, assume: Assumptions) -> float:
        efficiency = assume.gemm_efficiency if self.matmul_kind == "gemm" else assume.triton_efficiency
        rate = gpu.bf16_flops * efficiency
        warm_in_l2 = self.atomic_bytes_warm if assume.warm_atomics_in_l2 else 0.0
        in_l2 = self.atomic_bytes_hot + warm_in_l2
        rmw = 2 * (self.atomic_bytes_cold + self.atomic_bytes_warm - warm_in_l2)
        matmul = max(self.matmul_flops / rate, (self.matmul_bytes + rmw) / gpu.hbm_bytes_per_s,
                     in_l2 / assume.l2_atomic_bytes_per_s)
        serial = self.serial_flops / (rate * self.serial_fill)
        return (serial + matmul + self.stream_bytes / gpu.hbm_bytes_per_s
                + self.launches * assume.launch_s)


# bf16 tiles of pyalign/kernels/linear_logprobs.py, (BLOCK_N, BLOCK_V): forward, backward (the
# first kernel's 64 x 64; as built, 128 x 128 in a grouped launch order: paths()).
FUSED_FORWARD_TILE = (64, 128)
FUSED_BACKWARD_TILE = (64, 64)
# Tokens' worth of logits per chunk of the chunked CUDA strategy and the 3-matmul losses
# (pyalign._head_strategy.GPU_CHUNK_TOKENS; at most 1 GiB of them, 4096 at the anchor shapes).
CHUNK_TOKENS = 4096


def fused_tiles(shape: Shape, gpu: GPU = H100, *, forward_tile=FUSED_FORWARD_TILE,
                backward_tile=FUSED_BACKWARD_TILE, grouped: bool = False) -> Cost:
    """linear_token_logprobs, strategy "fused": the forward grid (N/BN,) has each program stream
    all of W (programs in step share it through L2); the backward grid (N/BN, V/BV) has each
    tile add BN x H into d_hidden and BV x H into d_weight with fp32 atomics. In launch order
    (row blocks fastest) the tiles running at once share one [BV, H] block of d_weight (hot in
    L2) and each adds to its own rows of d_hidden (4 N H bytes, over L2 past ~3k tokens: HBM).
    ``grouped``: a launch order in groups of row and column blocks (GEMM-style swizzle) whose
    d_hidden rows and d_weight blocks together fit L2, so both streams can stay there. The
    tiles' operand re-reads ((1/BN + 1/BV) N V H b) are served by L2 and not counted."""
    n, h, v, b = shape
    bn_f, _ = forward_tile
    bn_b, bv_b = backward_tile
    d_hidden = 4.0 * h * n * math.ceil(v / bv_b)
    d_weight = 4.0 * h * v * math.ceil(n / bn_b)
    return Cost(matmul_flops=6.0 * n * h * v, matmul_bytes=(n * h + v * h) * b,
                matmul_kind="triton", atomic_bytes_hot=d_weight,
                atomic_bytes_warm=d_hidden if grouped else 0.0,
                atomic_bytes_cold=0.0 if grouped else d_hidden, launches=3,
                held_bytes=4.0 * n * h, serial_flops=2.0 * n * h * v,
                serial_fill=min(1.0, math.ceil(n / bn_f) / gpu.sms))


def _chunk_gemm_bytes(shape: Shape, chunk: int, *, logits_gemms: int, weight_reads: int) -> float:
    """HBM bytes of one chunk of tokens' GEMMs: W read ``weight_reads`` times, d_weight's fp32
    accumulator read and written (beta = 1), the logits written ``logits_gemms`` times and read
    by the two gradient GEMMs, the chunk's hidden rows and their gradient."""
    _, h, v, b = shape
    return (weight_reads * v * h * b + 8.0 * v * h + (logits_gemms + 2) * chunk * v * b
            + 3 * chunk * h * b)


def vocabulary_slices(shape: Shape, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Slices of the chunked head's vocabulary walk: C V logits a slice over all N tokens
    (slice_width of pyalign/_chunked_head.py), the whole vocabulary once N <= C."""
    n, _, v, _ = shape
    return math.ceil(v / min(v, max(1, chunk_tokens * v // max(1, n))))


# Launches of the chunked head besides its matmuls and epilogues: per forward slice, the
# label-logit pick and the slice's row stats (~9 small torch ops); once, their exact combination
# (~25) and the backward's set-up and casts (~6).
SLICE_STAT_LAUNCHES, FIXED_CHUNKED_LAUNCHES = 9, 31


def chunked(shape: Shape, *, chunk_tokens: int = CHUNK_TOKENS, keep_logits: bool = False) -> Cost:
    """Strategy "chunked" as built (pyalign/_chunked_head.py, the Triton logprobs epilogue): both
    directions walk the vocabulary in S slices of every token's logits (C V logits a slice):
    cuBLAS logits (input dtype, fp32 accumulation), the epilogue (forward: row stats; backward:
    d-logits in place), d_hidden += dz W_s (fp32, beta = 1 after the first slice) and
    d_weight[s] = dzᵀ h (written once). Backward recomputes the logits (8NHV) unless they are
    kept (``keep_logits``: memory_budget, every token: one slice, 6NHV). HBM: W read 3 times (2
    kept), hidden 3 times a slice (2), the logits written by 2 GEMMs (1) and read by 2, d_hidden
    read and written by every slice but the first; the epilogue streams 3 N V b."""
    n, h, v, b = shape
    slices = 1 if keep_logits else vocabulary_slices(shape, chunk_tokens)
    passes = 2 if keep_logits else 3
    gemm_bytes = (passes * (v * h * b + slices * n * h * b) + (passes + 1) * n * v * b
                  + (8.0 * slices - 4.0) * n * h + 4.0 * v * h)
    return Cost(matmul_flops=(6.0 if keep_logits else 8.0) * n * h * v, matmul_bytes=gemm_bytes,
                matmul_kind="gemm", stream_bytes=3.0 * n * v * b,
                launches=slices * (2 + SLICE_STAT_LAUNCHES + 4) + FIXED_CHUNKED_LAUNCHES,
                held_bytes=(n * v * b) if keep_logits else min(n, chunk_tokens) * v * b)


def three_matmul_loss(shape: Shape, *, chunk_tokens: int = CHUNK_TOKENS,
                      reference_from_hidden: bool = False) -> Cost:
    """The fused losses' 3-matmul path (pyalign/ops/_fused_head.py): a scalar loss known in the
    forward forms its gradients there: logits, epilogue forward and backward in place, the two
    gradient GEMMs (6NHV); plus the reference head's logits and epilogue (2NHV, no gradient)
    when the reference is scored from hidden states."""
    n, h, v, b = shape
    chunk = min(n, chunk_tokens)
    chunks = math.ceil(n / chunk)
    reference = 1 if reference_from_hidden else 0
    gemm_bytes = chunks * (_chunk_gemm_bytes(shape, chunk, logits_gemms=1, weight_reads=2)
                           + reference * (v * h * b + chunk * v * b))
    return Cost(matmul_flops=(6.0 + 2.0 * reference) * n * h * v, matmul_bytes=gemm_bytes,
                matmul_kind="gemm", stream_bytes=(3.0 + reference) * n * v * b,
                launches=chunks * (5 + 2 * reference), held_bytes=chunk * v * b)


def liger_triton_flce(shape: Shape) -> Cost:
    """Liger-Kernel 0.8.5's Triton fused linear cross-entropy as its code chunks it
    (``next_power_of_2(ceil(N / ceil(V / H)))`` tokens: 32 chunks at these shapes, whatever N),
    for the same formulas: each chunk reads W twice and read-modify-writes the fp32 d_weight."""
    n, h, v, b = shape
    chunk = min(n, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h)))))
    chunks = math.ceil(n / chunk)
    gemm_bytes = chunks * _chunk_gemm_bytes(shape, chunk, logits_gemms=1, weight_reads=2)
    return Cost(matmul_flops=6.0 * n * h * v, matmul_bytes=gemm_bytes, matmul_kind="gemm",
                stream_bytes=2.0 * n * v * b, launches=chunks * 5)


def weight_update(parameters: int, *, kind: str, itemsize: int = 2, tensors: int = 291,
                  chunk_elements: int = 65536, blocks_per_launch: int = 320) -> Cost:
    """Multi-tensor lerp/ema (read target and source, write target), copy (read source, write
    target) and BEMA (read θ_t, θ_0 and the EMA, write the EMA and the reference); a 7B Llama
    has 291 tensors. Launches: chunks of ``chunk_elements`` packed ``blocks_per_launch`` a
    launch (csrc/common/multi_tensor.h)."""
    per_element = {"lerp": 3, "copy": 2, "bema": 5}[kind] * itemsize
    chunks = tensors * math.ceil(parameters / tensors / chunk_elements)
    return Cost(matmul_flops=0.0, matmul_bytes=0.0, matmul_kind="gemm",
                stream_bytes=float(parameters * per_element),
                launches=math.ceil(chunks / blocks_per_launch))


def token_logprobs(tokens: int, vocab: int, itemsize: int = 2) -> Cost:
    """Log-probs from materialised logits, one program per row: forward reads the logits,
    backward reads them and writes their gradient (into them with inplace_backward)."""
    return Cost(matmul_flops=0.0, matmul_bytes=0.0, matmul_kind="gemm",
                stream_bytes=3.0 * tokens * vocab * itemsize, launches=2)


ANCHOR_HIDDEN, ANCHOR_VOCAB = 4096, 128256
ANCHOR_TOKENS = (1024, 4096, 8192, 16384)
# The records of the issue, measured by their authors: (what, GPU, shape, ms forward + backward).
RECORDS = (
    ("Liger CuTe DSL fused linear cross-entropy", H200, Shape(1024, 4096, 128256), 4.78),
    ("Liger CuTe DSL fused linear cross-entropy", H200, Shape(4096, 4096, 128256), 16.7),
    ("Liger CuTe DSL fused linear cross-entropy", H200, Shape(16384, 4096, 128256), 73.7),
    ("Liger Triton fused linear cross-entropy", H200, Shape(1024, 4096, 128256), 137.6),
    ("Liger Triton fused linear cross-entropy", H200, Shape(4096, 4096, 128256), 142.6),
    ("Liger Triton fused linear cross-entropy", H200, Shape(16384, 4096, 128256), 185.5),
    ("Liger per-token log-prob head", H100, Shape(8192, 4096, 131072), 50.4),
)


def paths(shape: Shape, gpu: GPU) -> dict[str, Cost]:
    return {
        "fused tiles (Triton, atomics)": fused_tiles(shape, gpu),
        "fused tiles, 128x128 backward, grouped order": fused_tiles(
            shape, gpu, backward_tile=(128, 128), grouped=True),
        "chunked, recompute": chunked(shape),
        "chunked, logits kept (memory_budget)": chunked(shape, keep_logits=True),
        "3-matmul scalar loss": three_matmul_loss(shape),
        "3-matmul, reference from hidden": three_matmul_loss(shape, reference_from_hidden=True),
    }


def prediction(cost: Cost, gpu: GPU) -> tuple[float, float]:
    """(optimistic, pessimistic) seconds."""
    return cost.seconds(gpu, OPTIMISTIC), cost.seconds(gpu, PESSIMISTIC)


def _ms_range(cost: Cost, gpu: GPU) -> str:
    low, high = prediction(cost, gpu)
    return f"{low * 1e3:.3g}-{high * 1e3:.3g}"


def prediction_table() -> str:
    """Markdown: every head path at every anchor shape on both GPUs, with work and traffic."""
    lines = ["| path | N | TFLOP | matmul GB | stream GB | atomic GB (hot / warm / cold) | launches | "
             "held GiB | H100 ms | H200 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tokens in ANCHOR_TOKENS:
        shape = Shape(tokens, ANCHOR_HIDDEN, ANCHOR_VOCAB)
        for name, cost in paths(shape, H100).items():
            cells = " | ".join(_ms_range(paths(shape, gpu)[name], gpu) for gpu in GPUS)
            lines.append(f"| {name} | {tokens} | {cost.flops / 1e12:.3g} | "
                         f"{cost.matmul_bytes / 1e9:.3g} | {cost.stream_bytes / 1e9:.3g} | "
                         f"{cost.atomic_bytes_hot / 1e9:.3g} / {cost.atomic_bytes_warm / 1e9:.3g} / "
                         f"{cost.atomic_bytes_cold / 1e9:.3g} | "
                         f"{cost.launches} | {cost.held_bytes / 2**30:.2g} | {cells} |")
    return "\n".join(lines)


def records_table() -> str:
    """Markdown: each record beside the pyalign path that does the same work (and Liger's
    Triton head through the same formulas)."""
    lines = ["| record | GPU | N | V | record ms | modelled path | predicted ms |",
             "|---|---|---|---|---|---|---|"]
    for what, gpu, shape, ms in RECORDS:
        if "per-token" in what:
            name, cost = "pyalign chunked, recompute", chunked(shape)
        elif "Triton" in what:
            name, cost = "Liger's Triton chunking, these formulas", liger_triton_flce(shape)
        else:
            name, cost = "pyalign 3-matmul scalar loss", three_matmul_loss(shape)
        lines.append(f"| {what} | {gpu.name} | {shape.tokens} | {shape.vocab} | {ms} | {name} | "
                     f"{_ms_range(cost, gpu)} |")
    return "\n".join(lines)


def weights_table(parameters: int = 7_000_000_000) -> str:
    lines = ["| update (7B parameters, bf16) | GB moved | launches | H100 ms | H200 ms |",
             "|---|---|---|---|---|"]
    for kind in ("lerp", "copy", "bema"):
        cost = weight_update(parameters, kind=kind)
        cells = " | ".join(_ms_range(cost, gpu) for gpu in GPUS)
        lines.append(f"| {kind} | {cost.stream_bytes / 1e9:.3g} | {cost.launches} | {cells} |")
    return "\n".join(lines)


TABLES = {"predictions": prediction_table, "records": records_table, "weights": weights_table}
_BEGIN, _END = "<!-- cost-model: {} -->", "<!-- /cost-model -->"


def render(document: str) -> str:
    """``document`` with each generated table (between its begin and end markers) rewritten."""
    for name, table in TABLES.items():
        begin = _BEGIN.format(name)
        head, found, rest = document.partition(begin)
        if not found:
            raise ValueError(f"no {begin} marker")
        _, found, tail = rest.partition(_END)
        if not found:
            raise ValueError(f"no {_END} after {begin}")
        document = f"{head}{begin}\n{table()}\n{_END}{tail}"
    return document


def main(argv=None) -> int:
    """``python -m pyalign.bench.gpu_cost [--write DOC | --check DOC]``: print the tables, or
    rewrite / check the generated tables of DOC (docs/gpu.md)."""
    import argparse
    import pathlib
    parser = argparse.ArgumentParser(prog="python -m pyalign.bench.gpu_cost", description=main.__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=pathlib.Path)
    group.add_argument("--check", type=pathlib.Path)
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(render(args.write.read_text()))
    elif args.check:
        if render(args.check.read_text()) != args.check.read_text():
            print(f"{args.check}: its cost-model tables are stale; rerun with --write", flush=True)
            return 1
    else:
        print(*(table() for table in TABLES.values()), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
