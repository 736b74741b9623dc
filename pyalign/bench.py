"""`pyalign bench`: microbenchmarks of the fused ops against eager PyTorch, torch.compile, the
floor the hardware allows and (where installed) Liger-Kernel and TRL.

The cases are defined here so that `pyalign bench` and the scripts in benchmarks/ share them;
the harness (timing, memory, tables, JSON/CSV) is pyalign/_benchutil.py. Candidates come from
the backend table: every backend that can run the op family on the device is a row, so a new
backend shows up without edits here. Each timed call is forward + backward unless the case
says otherwise; inputs are random (logits ~ N(0, 1), labels uniform).

    pyalign bench                       # token_logprobs and linear_token_logprobs at CPU size
    pyalign bench --quick --json out.json
    pyalign bench --cases kl,preference,weights
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import pyalign
from pyalign import _benchutil, backends
from pyalign._benchutil import Candidate, Case

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Third-party baselines: import-guarded, reported as "not installed" when absent.
OPTIONAL_BASELINES = {"liger_kernel": "Liger-Kernel", "trl": "TRL"}

GPU_NOTE = ("GPU rows (the triton and cuda backends, Liger-Kernel kernels, CUDA-event timing) "
            "need a CUDA GPU: not run on this machine")


def optional_module(name: str):
    """The module, or None when it is not installed (or fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def benchmark_backends(family: str, device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to time for ``family`` on ``device``, notes on the ones left out)."""
    names, notes = [], []
    for name in backends.BACKENDS:
        ok, reason = backends.status(family, name, device.type)
        if name == "triton" and device.type == "cpu":
            notes.append("triton backend: on CPU it runs only in the Triton interpreter (tests); "
                         "timed on CUDA only")
        elif ok:
            names.append(name)
        elif not (device.type == "cpu" and name == "cuda") and not (
                device.type == "cuda" and name == "cpu"):  # the other device's backend: no note
            notes.append(f"{name} backend unavailable: {reason}")
    return names, notes


def _seeded_generator(device: torch.device, seed: int = 0) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _clear_grads(*tensors: torch.Tensor) -> Callable[[], None]:
    def clear():
        for tensor in tensors:
            tensor.grad = None
    return clear


def _compile_candidate(name: str, fn: Callable, args: tuple, grad_output, setup,
                       enabled: bool) -> Candidate:
    """torch.compile of the eager baseline ``fn`` (compiled once, timed after warm-up)."""
    if not enabled:
        return Candidate(name, kind="baseline", status="skipped (--no-compile)")
    compiled = torch.compile(fn, dynamic=False)

    def run():
        out = compiled(*args)
        out.backward(grad_output)
    return Candidate(name, run, setup=setup, kind="baseline", compiled=True)


def _ratio_columns(candidates: list[Candidate], **columns: str) -> dict:
    """Ratio columns: the given ones, plus "vs TRL" / "vs Liger" when such a row exists."""
    ratio_to = {label.replace("_", " "): name for label, name in columns.items()}
    for prefix in ("TRL", "Liger"):
        row = next((c.name for c in candidates if c.name.startswith(prefix)), None)
        if row is not None:
            ratio_to[f"vs {prefix}"] = row
    return ratio_to


def _third_party_notes() -> list[str]:
    notes = []
    for module, label in OPTIONAL_BASELINES.items():
        if optional_module(module) is None:
            notes.append(f"{label}: not installed")
    return notes


# ------------------------------------------------------------------------ token_logprobs

def naive_token_logprobs(logits, labels, temperature: float = 1.0):
    """The usual eager code: full fp32 log_softmax, then gather the label."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(
        -1, labels.unsqueeze(-1)).squeeze(-1)


def logprobs_case(num_tokens: int = 4096, vocab: int = 32000, dtype=torch.float32,
                  device="cpu", *, temperature: float = 1.0, compile: bool = True) -> Case:
    device = torch.device(device)
    generator = _seeded_generator(device)
    logits = torch.randn(num_tokens, vocab, device=device, dtype=dtype, generator=generator)
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    grad_logprobs = torch.randn(num_tokens, device=device, generator=generator)
    clear = _clear_grads(logits)

    def eager():
        naive_token_logprobs(logits, labels, temperature).backward(grad_logprobs)

    candidates = [Candidate("eager log_softmax+gather", eager, setup=clear, kind="baseline",
                            backend="eager")]
    candidates.append(_compile_candidate("torch.compile log_softmax+gather", naive_token_logprobs,
                                         (logits, labels, temperature), grad_logprobs, clear,
                                         compile))
    notes = []
    trl_utils = optional_module("trl.trainer.utils")
    if trl_utils is not None and hasattr(trl_utils, "selective_log_softmax"):
        def trl_selective():
            trl_utils.selective_log_softmax(logits, labels, temperature=temperature
                                            ).backward(grad_logprobs)
        candidates.append(Candidate("TRL selective_log_softmax", trl_selective, setup=clear,
                                    kind="baseline"))
    liger_functional = optional_module("liger_kernel.transformers.functional")
    if liger_functional is not None and device.type == "cuda":
        def liger_ce():
            # per-token cross entropy = -logprob; Liger takes no temperature: T = 1 only
            (-liger_functional.liger_cross_entropy(logits, labels, reduction="none")
             ).backward(grad_logprobs)
        if temperature == 1.0:
            candidates.append(Candidate("Liger cross_entropy (reduction=none)", liger_ce,
                                        setup=clear, kind="baseline"))
    elif liger_functional is not None:
        notes.append("Liger-Kernel cross_entropy: Triton kernels, GPU only: not run")
    names, backend_notes = benchmark_backends("logprobs", device)
    notes += backend_notes
    for name in names:
        def fused(name=name):
            pyalign.token_logprobs(logits, labels, temperature=temperature,
                                   backend=name).backward(grad_logprobs)
        candidates.append(Candidate(f"pyalign token_logprobs [{name}]", fused, setup=clear,
                                    backend=name))
    # In-place backward writes d logits into the logits buffer: each call gets its own copy of
    # the logits, refilled outside the timing.
    inplace_logits = None
    for name in names:
        if name == "eager":
            continue
        if inplace_logits is None:
            inplace_logits = torch.empty_like(logits).requires_grad_(True)

        def refill():
            inplace_logits.grad = None
            with torch.no_grad():
                inplace_logits.copy_(logits)

        def fused_inplace(name=name):
            pyalign.token_logprobs(inplace_logits, labels, temperature=temperature, backend=name,
                                   inplace_backward=True).backward(grad_logprobs)
        candidates.append(Candidate(f"pyalign token_logprobs [{name}] inplace_backward",
                                    fused_inplace, setup=refill, backend=name))
    exp_out = torch.empty_like(logits, requires_grad=False)
    plain_logits = logits.detach()

    def floor():
        torch.exp(plain_logits, out=exp_out)  # forward: one pass over the logits
        torch.exp(plain_logits, out=exp_out)  # backward: one more read and a write
    candidates.append(Candidate("floor: 2 passes of torch.exp", floor, kind="floor"))

    def memory_floor():
        plain_logits.sum()  # forward: one read
        exp_out.copy_(plain_logits)  # backward: one read, one write
    candidates.append(Candidate("memory floor: sum + copy_ (1 read; 1 read + 1 write)",
                                memory_floor, kind="floor"))
    notes += _third_party_notes()
    return Case("token_logprobs fwd+bwd",
                {"N": num_tokens, "V": vocab, "dtype": _dtype_name(dtype), "T": temperature,
                 "device": device.type},
                candidates,
                ratio_to=_ratio_columns(candidates, vs_eager="eager log_softmax+gather",
                                        vs_compile="torch.compile log_softmax+gather"),
                floor="floor: 2 passes of torch.exp", notes=notes)


# ----------------------------------------------------------------- linear_token_logprobs

def naive_linear_token_logprobs(hidden, weight, labels, temperature: float = 1.0):
    """The usual eager code: full [N, V] logits from the lm_head, then log_softmax + gather."""
    return naive_token_logprobs(hidden @ weight.t(), labels, temperature)


def linear_logprobs_case(num_tokens: int = 4096, hidden_size: int = 1024, vocab: int = 32000,
                         dtype=torch.float32, device="cpu", *, compile: bool = True) -> Case:
    device = torch.device(device)
    generator = _seeded_generator(device, 1)
    hidden = (torch.randn(num_tokens, hidden_size, device=device, generator=generator)
              ).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    grad_logprobs = torch.randn(num_tokens, device=device, generator=generator)
    clear = _clear_grads(hidden, weight)

    def eager():
        naive_linear_token_logprobs(hidden, weight, labels).backward(grad_logprobs)

    candidates = [Candidate("eager matmul+log_softmax+gather", eager, setup=clear,
                            kind="baseline", backend="eager"),
                  _compile_candidate("torch.compile matmul+log_softmax+gather",
                                     naive_linear_token_logprobs, (hidden, weight, labels),
                                     grad_logprobs, clear, compile)]
    notes = []
    liger_functional = optional_module("liger_kernel.transformers.functional")
    if liger_functional is not None and device.type == "cuda":
        def liger_flce():
            # per-token cross entropy = -logprob (reduction "none")
            loss = liger_functional.liger_fused_linear_cross_entropy(hidden, weight, labels,
                                                                     reduction="none")
            (-loss).backward(grad_logprobs)
        candidates.append(Candidate("Liger fused_linear_cross_entropy", liger_flce, setup=clear,
                                    kind="baseline"))
    elif liger_functional is not None:
        notes.append("Liger-Kernel fused_linear_cross_entropy: Triton kernels, GPU only: not run")
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes
    for name in names:
        def fused(name=name):
            pyalign.linear_token_logprobs(hidden, weight, labels,
                                          backend=name).backward(grad_logprobs)
        candidates.append(Candidate(f"pyalign linear_token_logprobs [{name}]", fused,
                                    setup=clear, backend=name))
    plain_hidden, plain_weight = hidden.detach(), weight.detach()
    logits_out = torch.empty(num_tokens, vocab, device=device, dtype=dtype)
    grad_logits = torch.randn(num_tokens, vocab, device=device, generator=generator).to(dtype)
    grad_hidden_out = torch.empty_like(plain_hidden)
    grad_weight_out = torch.empty_like(plain_weight)

    def floor():
        torch.mm(plain_hidden, plain_weight.t(), out=logits_out)  # forward
        torch.mm(grad_logits, plain_weight, out=grad_hidden_out)  # backward: d hidden
        torch.mm(grad_logits.t(), plain_hidden, out=grad_weight_out)  # backward: d weight
    candidates.append(Candidate("floor: the 3 bare matmuls", floor, kind="floor"))
    notes += _third_party_notes()
    flops = 3 * 2 * num_tokens * hidden_size * vocab
    notes.append(f"matmul work: {flops / 1e9:.3g} GFLOP per fwd+bwd (3 matmuls); a chunked "
                 "backend recomputes the forward matmul in backward (4 matmuls)")
    return Case("linear_token_logprobs fwd+bwd",
                {"N": num_tokens, "H": hidden_size, "V": vocab, "dtype": _dtype_name(dtype),
                 "device": device.type},
                candidates,
                ratio_to=_ratio_columns(candidates, vs_eager="eager matmul+log_softmax+gather",
                                        vs_compile="torch.compile matmul+log_softmax+gather"),
                floor="floor: the 3 bare matmuls", notes=notes)


# ------------------------------------------------------------------------------ kl_penalty

def naive_kl_k3(logprobs, ref_logprobs):
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def kl_case(num_tokens: int = 1 << 20, device="cpu", *, estimator: str = "k3",
            compile: bool = True) -> Case:
    device = torch.device(device)
    generator = _seeded_generator(device, 2)
    logprobs = (-torch.rand(num_tokens, device=device, generator=generator) * 5
                ).requires_grad_(True)
    ref_logprobs = (-torch.rand(num_tokens, device=device, generator=generator) * 5
                    ).requires_grad_(True)
    grad_kl = torch.randn(num_tokens, device=device, generator=generator)
    clear = _clear_grads(logprobs, ref_logprobs)
    naive = {"k1": lambda lp, ref: lp - ref,
             "k2": lambda lp, ref: 0.5 * (ref - lp) ** 2,
             "k3": naive_kl_k3}[estimator]

    def eager():
        naive(logprobs, ref_logprobs).backward(grad_kl)

    candidates = [Candidate(f"eager {estimator} formula", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  _compile_candidate(f"torch.compile {estimator} formula", naive,
                                     (logprobs, ref_logprobs), grad_kl, clear, compile)]
    names, notes = benchmark_backends("kl", device)
    for name in names:
        def fused(name=name):
            pyalign.kl_penalty(logprobs, ref_logprobs, estimator=estimator,
                               backend=name).backward(grad_kl)
        candidates.append(Candidate(f"pyalign kl_penalty [{name}]", fused, setup=clear,
                                    backend=name))
    return Case("kl_penalty fwd+bwd", {"N": num_tokens, "estimator": estimator,
                                       "device": device.type},
                candidates, ratio_to={"vs eager": f"eager {estimator} formula",
                                      "vs compile": f"torch.compile {estimator} formula"},
                notes=notes)


# ------------------------------------------------------------------------- preference_loss

def naive_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def preference_case(batch: int = 4096, device="cpu", *, beta: float = 0.1,
                    compile: bool = True) -> Case:
    device = torch.device(device)
    generator = _seeded_generator(device, 3)
    sequence_logps = [(-torch.rand(batch, device=device, generator=generator) * 100
                       ).requires_grad_(True) for _ in range(4)]
    clear = _clear_grads(*sequence_logps)

    def eager():
        naive_dpo_loss(*sequence_logps, beta).backward()

    candidates = [Candidate("eager DPO formula", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  _compile_candidate("torch.compile DPO formula", naive_dpo_loss,
                                     (*sequence_logps, beta), None, clear, compile)]
    names, notes = benchmark_backends("preference", device)
    for name in names:
        def fused(name=name):
            pyalign.preference_loss(*sequence_logps, loss="sigmoid", beta=beta,
                                    backend=name).loss.backward()
        candidates.append(Candidate(f"pyalign preference_loss sigmoid [{name}]", fused,
                                    setup=clear, backend=name))
    return Case("preference_loss (DPO) fwd+bwd", {"B": batch, "device": device.type}, candidates,
                ratio_to={"vs eager": "eager DPO formula",
                          "vs compile": "torch.compile DPO formula"}, notes=notes)


def linear_preference_case(pairs: int = 4, seq_len: int = 256, hidden_size: int = 512,
                           vocab: int = 32000, dtype=torch.float32, device="cpu", *,
                           beta: float = 0.1) -> Case:
    """DPO from the last hidden states of the policy and of the reference model (same lm_head
    weight; the reference without gradient): pyalign's fused path vs the eager full-logits path,
    and Liger-Kernel's LigerFusedLinearDPOLoss where installed."""
    device = torch.device(device)
    generator = _seeded_generator(device, 4)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq_len, hidden_size, device=device, generator=generator
                         ).to(dtype).requires_grad_(True)
    ref_hidden = torch.randn(rows, seq_len, hidden_size, device=device, generator=generator
                             ).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    ref_weight = weight.detach()
    labels = torch.randint(0, vocab, (rows, seq_len), device=device, generator=generator)
    labels[:, : seq_len // 4] = -100  # the prompt
    clear = _clear_grads(hidden, weight)
    mask = labels != -100
    safe_labels = labels.clamp(min=0)

    def eager():
        policy = (naive_linear_token_logprobs(hidden, weight, safe_labels) * mask).sum(-1)
        with torch.no_grad():
            ref = (naive_linear_token_logprobs(ref_hidden, ref_weight, safe_labels) * mask).sum(-1)
        naive_dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta).backward()

    candidates = [Candidate("eager full logits + DPO", eager, setup=clear, kind="baseline",
                            backend="eager")]
    notes = []
    liger_chunked = optional_module("liger_kernel.chunked_loss")
    if liger_chunked is not None and hasattr(liger_chunked, "LigerFusedLinearDPOLoss"):
        try:
            liger_loss = liger_chunked.LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True)

            def liger_run():
                out = liger_loss(weight, hidden, labels, ref_input=ref_hidden,
                                 ref_weight=ref_weight)
                (out[0] if isinstance(out, tuple) else out).backward()
            candidates.append(Candidate("Liger LigerFusedLinearDPOLoss", liger_run, setup=clear,
                                        kind="baseline", compiled=True))
        except Exception as exc:  # an API this code does not know: say so, run the rest
            notes.append(f"Liger-Kernel LigerFusedLinearDPOLoss: could not construct ({exc})")
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes
    # The named backend runs the per-token part; the loss part falls back to "auto" where the
    # backend has no loss kernel (see linear_preference_loss).
    for name in names:
        def fused(name=name):
            pyalign.linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, loss="sigmoid", beta=beta,
                                           backend=name).loss.backward()
        candidates.append(Candidate(f"pyalign linear_preference_loss [{name}]", fused,
                                    setup=clear, backend=name))
    notes += _third_party_notes()
    return Case("linear_preference_loss (DPO, reference from hidden states) fwd+bwd",
                {"B": pairs, "T": seq_len, "H": hidden_size, "V": vocab,
                 "dtype": _dtype_name(dtype), "device": device.type},
                candidates,
                ratio_to=_ratio_columns(candidates, vs_eager="eager full logits + DPO"),
                notes=notes)


# ------------------------------------------------------------------------ weights ema_/lerp_

def model_like_shapes(total_params: int, num_tensors: int = 200) -> list[tuple[int, ...]]:
    """Shapes of a transformer-like stack: per layer q, k, v, o [d, d], up [4d, d],
    down [d, 4d] and two norms [d]; d picked so the total is about ``total_params``."""
    layers = max(1, num_tensors // 8)
    width = max(8, int(round((total_params / (12 * layers)) ** 0.5 / 8)) * 8)
    shapes = []
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,), (width,)]
    return shapes


def weights_case(total_params: int = 20_000_000, device="cpu", *, num_tensors: int = 200,
                 target_dtype=torch.float32, source_dtype=torch.float32,
                 decay: float = 0.99, weight: float = 0.6) -> Case:
    device = torch.device(device)
    generator = _seeded_generator(device, 5)
    shapes = model_like_shapes(total_params, num_tensors)
    targets = [torch.randn(s, device=device, generator=generator).to(target_dtype) for s in shapes]
    sources = [torch.randn(s, device=device, generator=generator).to(source_dtype) for s in shapes]
    numel = sum(t.numel() for t in targets)
    target_bytes = numel * targets[0].element_size()
    source_bytes = numel * sources[0].element_size()
    update_bytes = 2 * target_bytes + source_bytes  # read target and source, write target
    copy_bytes = target_bytes + source_bytes
    candidates = []
    names, notes = benchmark_backends("weights", device)
    for name in names:
        candidates.append(Candidate(f"pyalign.ema_ [{name}]",
                                    lambda name=name: pyalign.ema_(targets, sources, decay,
                                                                   backend=name),
                                    backend=name, bytes_moved=update_bytes))
        candidates.append(Candidate(f"pyalign.lerp_ [{name}]",
                                    lambda name=name: pyalign.lerp_(targets, sources, weight,
                                                                    backend=name),
                                    backend=name, bytes_moved=update_bytes))
        candidates.append(Candidate(f"pyalign.copy_ [{name}]",
                                    lambda name=name: pyalign.copy_(targets, sources,
                                                                    backend=name),
                                    backend=name, bytes_moved=copy_bytes))
    if target_dtype == source_dtype:
        candidates.append(Candidate("torch._foreach_lerp_",
                                    lambda: torch._foreach_lerp_(targets, sources, weight),
                                    kind="baseline", bytes_moved=update_bytes))
    else:
        notes.append("torch._foreach_lerp_ needs equal dtypes: not run")

    def loop():
        with torch.no_grad():
            for target, source in zip(targets, sources):
                target.lerp_(source.to(target.dtype), weight)
    candidates.append(Candidate("eager loop Tensor.lerp_", loop, kind="baseline",
                                bytes_moved=update_bytes))
    flat_target = torch.empty(numel, device=device, dtype=target_dtype)
    flat_source = torch.randn(numel, device=device, generator=generator).to(source_dtype)
    candidates.append(Candidate("floor: one Tensor.copy_ of the same bytes",
                                lambda: flat_target.copy_(flat_source), kind="floor",
                                bytes_moved=copy_bytes))
    notes.append("GB/s = bytes moved / median time: ema_/lerp_ read target and source and "
                 "write target; copy reads source and writes target")
    ratio_to = {"vs loop": "eager loop Tensor.lerp_"}
    if target_dtype == source_dtype:
        ratio_to["vs foreach"] = "torch._foreach_lerp_"
    return Case("weights ema_/lerp_/copy_ (in place, no autograd)",
                {"tensors": len(shapes), "params": numel, "target": _dtype_name(target_dtype),
                 "source": _dtype_name(source_dtype), "device": device.type},
                candidates, ratio_to=ratio_to,
                floor="floor: one Tensor.copy_ of the same bytes", notes=notes)


# --------------------------------------------------------------------------- the suite/CLI

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def suite_builders(args) -> dict[str, Callable[[], Case]]:
    """Case builders for `pyalign bench` by name, at the default or --quick size."""
    device, dtype, compile = args.device, DTYPES[args.dtype], not args.no_compile
    if args.quick:
        return {
            "logprobs": lambda: logprobs_case(64, 1000, dtype, device, compile=compile),
            "linear_logprobs": lambda: linear_logprobs_case(64, 32, 1000, dtype, device,
                                                            compile=compile),
            "kl": lambda: kl_case(4096, device, compile=compile),
            "preference": lambda: preference_case(64, device, compile=compile),
            "linear_preference": lambda: linear_preference_case(2, 16, 32, 500, dtype, device),
            "weights": lambda: weights_case(100_000, device, num_tensors=16),
        }
    return {
        "logprobs": lambda: logprobs_case(4096, 32000, dtype, device, compile=compile),
        # N and H below the 4096 x 1024: that size is ~1 TFLOP per fwd+bwd, ~20 s a call
        # at the ~50 GFLOP/s of 2 cores. benchmarks/bench_linear_logprobs.py runs any size.
        "linear_logprobs": lambda: linear_logprobs_case(1024, 512, 32000, dtype, device,
                                                        compile=compile),
        "kl": lambda: kl_case(1 << 20, device, compile=compile),
        "preference": lambda: preference_case(4096, device, compile=compile),
        "linear_preference": lambda: linear_preference_case(4, 256, 512, 32000, dtype, device),
        "weights": lambda: weights_case(20_000_000, device),
    }


DEFAULT_CASES = ("logprobs", "linear_logprobs")

USAGE = """Microbenchmarks: each case runs its candidates (eager PyTorch, torch.compile, pyalign on
every available backend, Liger-Kernel and TRL where installed, and a floor) on the same inputs,
forward + backward, and prints median time, peak extra memory and ratios; the table goes to
stdout, progress to stderr.

    pyalign bench                          # token_logprobs, linear_token_logprobs
    pyalign bench --quick --json out.json  # tiny sizes
    pyalign bench --cases all --threads 1  # every case; one thread on a busy machine
"""


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of logits / hidden / weight (default float32)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per candidate (median reported; default 3, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls first, the last one under the memory probe "
                             "(default 1; torch.compile rows get at least 2)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile rows (their warm-up is the slow part)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the results as CSV")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a loaded machine "
                             "--threads 1 avoids the stalls of OpenMP threads waiting for "
                             "descheduled peers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def add_bench_parser(subparsers):
    parser = subparsers.add_parser(
        "bench", help="kernel microbenchmarks (median time, peak memory, ratios vs eager)",
        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated from logprobs, linear_logprobs, kl, preference, "
                             "linear_preference, weights, or 'all' (default: %(default)s)")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyalign bench: --device cuda, but no CUDA GPU is available")
    return device


def _cpu_model() -> str:
    try:  # the extension's build key names the CPU model the same way
        from pyalign._build import _cpu_model as build_cpu_model
        return build_cpu_model()
    except ImportError:
        return platform.processor() or platform.machine()


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pyalign": pyalign.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": _load_average(),
        "optional": {label: optional_module(module) is not None
                     for module, label in OPTIONAL_BASELINES.items()},
    }
    if device.type == "cpu":
        info["memory_probe"] = _benchutil.cpu_memory_probe()
    return info


def run_cases(builders: list[Callable[[], Case]], args, out=None) -> int:
    """Build, run and print each case in turn (inputs of one case are freed before the next);
    write --json / --csv. Returns the exit code (1 when any candidate failed)."""
    out = out or sys.stdout
    device = _resolve_device(args.device)
    args.device = str(device)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_cases(builders, args, device, out)
    finally:
        torch.set_num_threads(threads_before)  # callers in the same process keep theirs


def _run_cases(builders, args, device: torch.device, out) -> int:
    reps = args.reps if args.reps is not None else (5 if device.type == "cuda" else 3)
    env = environment(device)
    header = (f"pyalign {env['pyalign']} bench on {env['device']} ({env['device_name']}), "
              f"torch {env['torch']}, {env['cpu_threads']} CPU threads; median of {reps} "
              f"after {args.warmup} warm-up; ratios = reference time / row time (>1 = faster)")
    print(header, file=out)
    probe = env.get("memory_probe")
    if probe is not None:
        verdict = "ok" if probe["ok"] else "FAILED: CPU peak memory numbers are not trustworthy"
        print(f"CPU peak-memory probe: {probe['measured_mib']:.1f} MiB measured for a known "
              f"{probe['expected_mib']:.1f} MiB peak: {verdict}", file=out)
    notes = [] if device.type == "cuda" else [GPU_NOTE]
    load = env["load_average"]
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        notes.append(f"warning: this machine is loaded (1-minute load average {load:.1f} on "
                     f"{os.cpu_count()} cores): CPU timings are noisy, multi-threaded ones can "
                     "stall (try --threads 1)")
    for note in notes:
        print(note, file=out)
    records, failed = [], False
    for build in builders:
        case = build()
        progress = _benchutil.make_progress(_benchutil.progress_steps(case, reps), case.title,
                                            enabled=not args.no_progress)
        try:
            rows = _benchutil.run_case(case, device, warmup=args.warmup, reps=reps,
                                       measure_memory=not args.no_memory, progress=progress)
        finally:
            progress.close()
        failed |= any(row.status.startswith("error") for row in rows)
        print("\n" + _benchutil.format_table(case, rows), file=out, flush=True)
        records.append(_benchutil.case_record(case, rows))
        del case, rows
    if args.json:
        _benchutil.write_json(args.json, {"environment": env, "reps": reps,
                                          "warmup": args.warmup, "notes": notes,
                                          "cases": records})
    if args.csv:
        _benchutil.write_csv(args.csv, records)
    return 1 if failed else 0


def run_bench(args) -> int:
    """Entry point of `pyalign bench` (wired into pyalign/cli.py)."""
    args.device = str(_resolve_device(args.device))
    builders = suite_builders(args)
    names = list(builders) if args.cases.strip() == "all" else [
        name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in builders]
    if unknown:
        print(f"pyalign bench: unknown case(s) {unknown}; choose from {sorted(builders)} or 'all'",
              file=sys.stderr)
        return 2
    return run_cases([builders[name] for name in names], args)


def script_main(build: Callable[[argparse.Namespace], list[Callable[[], Case]]],
                configure: Callable[[argparse.ArgumentParser], None], description: str,
                argv=None) -> int:
    """The body of a benchmarks/*.py script: common arguments plus the script's own sizes."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    configure(parser)
    args = parser.parse_args(argv)
    args.device = str(_resolve_device(args.device))
    return run_cases(build(args), args)
