"""`pyalign bench`: the subcommand's options and help; the cases, the run loop and the output are
pyalign.bench's."""
from __future__ import annotations

import argparse

from pyalign.bench import suite

USAGE = """Microbenchmarks: each case runs its candidates (eager PyTorch, torch.compile, pyalign on
every available backend, Liger-Kernel and TRL where installed, and a floor) on the same inputs,
forward + backward, and prints median time, peak extra memory and ratios; the table goes to
stdout, progress to stderr.

    pyalign bench                          # token_logprobs, linear_token_logprobs
    pyalign bench --quick --json out.json  # tiny sizes
    pyalign bench --cases all --threads 1  # every case; one thread on a busy machine
    pyalign bench --cases linear_logprobs --tokens 4096 --hidden 1024 --vocab 128256
    pyalign bench --cases linear_preference_128k --threads 2   # DPO at V = 128256
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``bench`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser(
        "bench", help="kernel microbenchmarks (median time, peak memory, ratios vs eager)",
        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_common_arguments(parser)
    suite.add_size_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--cases", default=",".join(suite.DEFAULT_CASES),
                        help=f"comma-separated from {', '.join(suite.case_names())}, or 'all' "
                             "(default: %(default)s)")
    parser.set_defaults(func=run_bench)
    return parser


def run_bench(args) -> int:
    return suite.run_bench(args)
