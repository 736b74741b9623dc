"""token_logprobs forward + backward: naive eager log_softmax+gather, torch.compile of it, TRL's
selective_log_softmax and Liger-Kernel's cross entropy (where installed), pyalign on every
available backend (and with inplace_backward), and the floor: two passes of torch.exp over the
logits (one read forward, one read + write backward).

    python benchmarks/bench_logprobs.py --tokens 4096 --vocab 32000 --json out.json
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--tokens", type=int, default=4096, help="N, rows of logits")
    parser.add_argument("--vocab", type=int, default=32000, help="V")
    parser.add_argument("--temperature", type=float, default=1.0)


def build(args):
    return [lambda: bench.logprobs_case(args.tokens, args.vocab, bench.DTYPES[args.dtype],
                                        args.device, temperature=args.temperature,
                                        compile=not args.no_compile)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
