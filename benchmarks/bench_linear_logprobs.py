"""linear_token_logprobs forward + backward (from the last hidden state, random per-token
upstream gradients): naive eager (full [N, V] logits, log_softmax, gather), torch.compile of it,
pyalign on every available backend (and the cpu backend with a memory budget holding every
token's logits), Liger-Kernel's LigerFusedLinearScaledCrossEntropyFunction, TRL's
ChunkedLogProbFunction and Cut Cross-Entropy's torch_compile path (where installed), and the
floor: the bare matmuls (hidden @ weight.T forward, the two backward matmuls).

    python benchmarks/bench_linear_logprobs.py --tokens 2048 --hidden 512 --vocab 32000 [--entropy]

The 128k-vocabulary case of the fused-head goals (N=4096, H=1024, V=128256; 3.2 TFLOP of bare
matmuls a call, over a minute per call on 2 CPU cores, 5 calls a row), without and with entropy:

    python benchmarks/bench_linear_logprobs.py --tokens 4096 --hidden 1024 --vocab 128256 --threads 2
    python benchmarks/bench_linear_logprobs.py --tokens 4096 --hidden 1024 --vocab 128256 --threads 2 \
        --entropy

It holds 2.5 GiB of inputs (W is 0.5 GiB, the floor's [N, V] buffer 2 GiB); the rows that hold
whole [N, V] logits need several times 2 GiB, and a row whose estimate is above the memory
available (or --memory-limit GIB) is skipped with its need printed (TRL's ~25 GiB here).
"""
import sys

from pyalign import bench


def configure(parser):
    parser.add_argument("--tokens", type=int, default=1024, help="N, rows of hidden")
    parser.add_argument("--hidden", type=int, default=512, help="H")
    parser.add_argument("--vocab", type=int, default=32000, help="V")
    parser.add_argument("--entropy", action="store_true",
                        help="also the entropy, with its own random upstream gradient")
    parser.add_argument("--no-peers", action="store_true", help="without Liger, TRL and CCE")


def build(args):
    return [lambda: bench.linear_logprobs_case(args.tokens, args.hidden, args.vocab,
                                               bench.DTYPES[args.dtype], args.device,
                                               compile=not args.no_compile,
                                               entropy=args.entropy, peers=not args.no_peers)]


if __name__ == "__main__":
    sys.exit(bench.script_main(build, configure, __doc__))
