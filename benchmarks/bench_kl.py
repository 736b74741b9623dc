"""kl_penalty forward + backward: the eager estimator formula, torch.compile of it, and pyalign
on every available backend.

    python benchmarks/bench_kl.py --tokens 1048576 --estimator k3
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--tokens", type=int, default=1 << 20, help="N")
    parser.add_argument("--estimator", default="k3", choices=("k1", "k2", "k3"))


def build(args):
    return [lambda: bench.kl_case(args.tokens, args.device, estimator=args.estimator,
                                  compile=not args.no_compile)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
