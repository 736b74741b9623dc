"""The head benchmark of the GPU check (benchmarks/gpu_check.sh): linear_token_logprobs forward +
backward with per-token upstream gradients at docs/gpu.md's anchor shapes (H = 4096,
V = 128256, 1k/4k/8k/16k tokens, bf16), without and with entropy: pyalign's rows (one per
strategy where linear_token_logprobs takes ``strategy``), the peers that import (Liger-Kernel,
TRL's ChunkedLogProbFunction, Cut Cross-Entropy), eager PyTorch and the bare-matmul floors.

    python benchmarks/bench_gpu_head.py --json OUT/bench.json --budget-s 170
    python benchmarks/bench_gpu_head.py --device cpu --dtype float32 --tokens 64,128 \\
        --hidden 32 --vocab 1000                       # toy size: does it start

Cases run one at a time, without entropy first (every N ascending), then with; after each the
JSON file is rewritten, so a run cut short keeps what it measured. A case predicted (from the
last one, in proportion to N) to end past ``--budget-s`` is not started, and is listed under
"skipped_cases" with the reason. benchmarks/gpu_report.py puts the rows beside the cost model.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

import pyalign
from pyalign.bench import harness, suite
from pyalign.bench.common import DTYPES
from pyalign.bench.gpu_cost import ANCHOR_HIDDEN, ANCHOR_TOKENS, ANCHOR_VOCAB
from pyalign.bench.linear_logprobs import anchor_builders

ENTROPY = {"both": (False, True), "no": (False,), "yes": (True,)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_common_arguments(parser)
    parser.set_defaults(dtype="bfloat16", no_compile=True)
    parser.add_argument("--compile", dest="no_compile", action="store_false",
                        help="add the torch.compile rows (a compile per shape: minutes)")
    parser.add_argument("--tokens", default=",".join(map(str, ANCHOR_TOKENS)),
                        help="comma-separated N (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=ANCHOR_HIDDEN, help="H (default %(default)s)")
    parser.add_argument("--vocab", type=int, default=ANCHOR_VOCAB, help="V (default %(default)s)")
    parser.add_argument("--entropy", choices=sorted(ENTROPY), default="both",
                        help="cases without entropy, with it, or both (default)")
    parser.add_argument("--no-peers", action="store_true", help="without Liger, TRL and CCE")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no case predicted to end after this many seconds")
    args = parser.parse_args(argv)
    args.tokens = [int(n) for n in args.tokens.split(",") if n.strip()]
    return args


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    pyalign.empty_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _predicted_seconds(last, tokens: int):
    """The next case's seconds from the last one's, in proportion to N (None: nothing yet)."""
    return None if last is None else last[1] * tokens / last[0]


def run(args, out=None) -> int:
    """Run the cases in turn within the budget; returns 1 when a row failed, else 0."""
    out = out or sys.stdout
    device = suite._resolve_device(args.device)
    builders = anchor_builders(args.tokens, args.hidden, args.vocab, DTYPES[args.dtype], device,
                               entropy=ENTROPY[args.entropy], compile=not args.no_compile,
                               peers=not args.no_peers)
    merged = {"cases": [], "skipped_cases": [], "budget_s": args.budget_s}
    json_path, rc, last, start = args.json, 0, None, time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for tokens, entropy, build in builders:
            elapsed = time.monotonic() - start
            predicted = _predicted_seconds(last, tokens)
            if args.budget_s is not None and predicted is not None and \
                    elapsed + predicted > args.budget_s:
                reason = (f"time budget: {elapsed:.0f} s spent, this case predicted at "
                          f"{predicted:.0f} s, budget {args.budget_s:.0f} s")
                merged["skipped_cases"].append({"N": tokens, "entropy": entropy, "reason": reason})
                print(f"\nN={tokens} entropy={entropy}: not run ({reason})", file=out, flush=True)
                continue
            _free_device_memory(device)
            args.json = os.path.join(scratch, "case.json")
            case_start = time.monotonic()
            try:
                rc = max(rc, suite.run_cases([build], args, out=out))
            except Exception as exc:  # noqa: BLE001 - building the case failed: the next runs
                reason = harness._error_status(exc)
                merged["skipped_cases"].append({"N": tokens, "entropy": entropy, "reason": reason})
                print(f"\nN={tokens} entropy={entropy}: {reason}", file=out, flush=True)
                rc = 1
                continue
            last = (tokens, time.monotonic() - case_start)
            with open(args.json) as handle:
                payload = json.load(handle)
            merged.update({key: value for key, value in payload.items() if key != "cases"})
            merged["cases"] += payload["cases"]
            if json_path:
                harness.write_json(json_path, merged)
    if json_path:
        harness.write_json(json_path, merged)
    return rc


if __name__ == "__main__":
    sys.exit(run(parse_args()))
