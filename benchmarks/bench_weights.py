"""ema_ / lerp_ / copy_ over ~200 model-like tensors, in place: pyalign on every available
backend vs torch._foreach_lerp_ and a per-tensor Tensor.lerp_ loop, against the floor of one
Tensor.copy_ of the same bytes; a GB/s column.

    python benchmarks/bench_weights.py --params 20000000
    python benchmarks/bench_weights.py --full                 # ~100M parameters
    python benchmarks/bench_weights.py --source-dtype bfloat16 # fp32 EMA of bf16 weights
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--params", type=int, default=20_000_000, help="total parameters")
    parser.add_argument("--full", action="store_true", help="~100M parameters")
    parser.add_argument("--tensors", type=int, default=200, help="about this many tensors")
    parser.add_argument("--source-dtype", default="float32", choices=sorted(bench.DTYPES))


def build(args):
    params = 100_000_000 if args.full else args.params
    return [lambda: bench.weights_case(params, args.device, num_tensors=args.tensors,
                                       target_dtype=bench.DTYPES[args.dtype],
                                       source_dtype=bench.DTYPES[args.source_dtype])]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
