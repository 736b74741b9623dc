"""linear_kto_loss (KTO from the hidden states of policy and reference) forward + backward
against the eager full-logits path and Liger-Kernel's LigerFusedLinearKTOLoss (where installed).

    python benchmarks/bench_kto.py --batch 8 --seq 256 --hidden 512 --vocab 32000
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--batch", type=int, default=8, help="B (completions)")
    parser.add_argument("--seq", type=int, default=256, help="T")
    parser.add_argument("--hidden", type=int, default=512, help="H")
    parser.add_argument("--vocab", type=int, default=32000, help="V")


def build(args):
    return [lambda: bench.linear_kto_case(args.batch, args.seq, args.hidden, args.vocab,
                                          bench.DTYPES[args.dtype], args.device)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
