"""`pyalign bench | train | study | export | doctor`: the command line. Each subcommand lives in
its own module of this package (doctor, bench, train, study, export) and adds its own parser.

`doctor` is a diagnosis: it must print even where the training or benchmark stack cannot be
imported (a missing or broken dependency), so the other subcommands are imported defensively and
one that fails to import is listed with the reason and exits 2 when called.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pyalign.cli import doctor

# (subcommand, module, help shown when the module cannot be imported)
_OPTIONAL_SUBCOMMANDS = (
    ("bench", "pyalign.cli.bench", "kernel microbenchmarks"),
    ("train", "pyalign.cli.train", "train on the embedded task"),
    ("study", "pyalign.cli.study", "KL-budget study on the embedded task"),
    ("export", "pyalign.cli.export", "write a run's policy as a transformers model"),
)


def _add_optional(subparsers, name: str, module: str, help_text: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        reason = str(exc)  # ``exc`` itself is unbound once the except block ends
        parser = subparsers.add_parser(name, help=f"{help_text} (unavailable: {reason})")

        def unavailable(args) -> int:
            print(f"pyalign {name}: {reason}", file=sys.stderr)
            return 2
        parser.set_defaults(func=unavailable)
        return
    mod.add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyalign", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    doctor.add_parser(subparsers)
    for name, module, help_text in _OPTIONAL_SUBCOMMANDS:
        _add_optional(subparsers, name, module, help_text)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
