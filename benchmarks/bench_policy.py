"""policy_loss (GRPO from per-token log-probs) and linear_policy_loss (GRPO from the last hidden
states) forward + backward against eager PyTorch, torch.compile and, for the fused head,
Liger-Kernel's LigerFusedLinearGRPOLoss (where installed).

    python benchmarks/bench_policy.py --batch 8 --seq 256 --hidden 512 --vocab 32000
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--batch", type=int, default=8, help="B (completions)")
    parser.add_argument("--seq", type=int, default=256, help="T (completion length)")
    parser.add_argument("--hidden", type=int, default=512, help="H (linear_policy)")
    parser.add_argument("--vocab", type=int, default=32000, help="V (linear_policy)")


def build(args):
    compile = not args.no_compile
    return [lambda: bench.policy_case(args.batch, args.seq, args.device, compile=compile),
            lambda: bench.linear_policy_case(args.batch, args.seq, args.hidden, args.vocab,
                                             bench.DTYPES[args.dtype], args.device,
                                             compile=compile)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
