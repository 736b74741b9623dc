"""preference_loss (DPO) forward + backward on sequence log-probs: eager formula, torch.compile,
pyalign backends. With --linear, also the fused path from hidden states
(linear_preference_loss) against the eager full-logits path and Liger-Kernel's
LigerFusedLinearDPOLoss (where installed).

    python benchmarks/bench_preference.py --batch 4096 --linear --pairs 4 --seq 256
    python benchmarks/bench_preference.py --linear --vocab 128256 --threads 2   # DPO at 128k

(`pyalign bench --cases linear_preference_128k --threads 2` is the same DPO case at V=128256.)
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--batch", type=int, default=4096, help="pairs for preference_loss")
    parser.add_argument("--linear", action="store_true", help="also linear_preference_loss")
    parser.add_argument("--pairs", type=int, default=4, help="B for linear_preference_loss")
    parser.add_argument("--seq", type=int, default=256, help="T for linear_preference_loss")
    parser.add_argument("--hidden", type=int, default=512, help="H")
    parser.add_argument("--vocab", type=int, default=32000, help="V")


def build(args):
    builders = [lambda: bench.preference_case(args.batch, args.device,
                                              compile=not args.no_compile)]
    if args.linear:
        builders.append(lambda: bench.linear_preference_case(
            args.pairs, args.seq, args.hidden, args.vocab, bench.DTYPES[args.dtype],
            args.device))
    return builders


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
