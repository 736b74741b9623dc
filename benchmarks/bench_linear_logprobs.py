"""linear_token_logprobs forward + backward (from the last hidden state): naive eager (full
[N, V] logits, log_softmax, gather), torch.compile of it, Liger-Kernel's fused linear cross
entropy (GPU, where installed), pyalign on every available backend, and the floor: the bare
matmuls (hidden @ weight.T forward, the two backward matmuls).

    python benchmarks/bench_linear_logprobs.py --tokens 4096 --hidden 1024 --vocab 32000
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--tokens", type=int, default=1024, help="N, rows of hidden")
    parser.add_argument("--hidden", type=int, default=512, help="H")
    parser.add_argument("--vocab", type=int, default=32000, help="V")


def build(args):
    return [lambda: bench.linear_logprobs_case(args.tokens, args.hidden, args.vocab,
                                               bench.DTYPES[args.dtype], args.device,
                                               compile=not args.no_compile)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
