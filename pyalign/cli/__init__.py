"""`pyalign doctor | train | study | bench | export`: the command line.

Each subcommand lives in its own module of this package and adds its own parser
(``add_parser(subparsers)``; the one line `pyalign --help` shows for it is in ``SUBCOMMANDS``).

Only the module of the subcommand being run is imported: `pyalign --help` lists the subcommands
from ``SUBCOMMANDS`` below without importing any of them (nor torch), and `pyalign train ...`
imports pyalign.cli.train alone. A subcommand module keeps its heavy imports (torch's compiler,
transformers, the trainers, the study, the benchmarks) inside the function that runs it, so its
``--help`` is quick too.

`pyalign train --help` is the one help that cannot be built quickly: its flags are the fields of
the settings dataclasses, whose modules import torch (the loss registry, the trainers). Its text
is therefore generated from those dataclasses into ``pyalign/cli/help/train.txt`` (``python -m
pyalign.cli --write-help``) and printed from there; tests/test_cli.py fails when the file is not
what the live parser prints, so it cannot go stale.

`doctor` is a diagnosis: it must print even where the training or benchmark stack cannot be
imported (a missing or broken dependency), so a subcommand module that fails to import is
registered with the reason and exits 2 when called.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# (subcommand, module, the one line `pyalign --help` shows for it)
SUBCOMMANDS = (
    ("doctor", "pyalign.cli.doctor", "versions, backends and why any cannot load"),
    ("train", "pyalign.cli.train", "train on the embedded task or your own model and data "
                                   "(DPO, IPO, SLiC, KTO, TR-*, RLOO, Elastic Reset)"),
    ("study", "pyalign.cli.study", "KL-budget study: sweeps, fits, frontiers, report"),
    ("bench", "pyalign.cli.bench", "kernel microbenchmarks (median time, peak memory, ratios)"),
    ("export", "pyalign.cli.export", "write a run's policy as a transformers model (save_pretrained)"),
)


# Subcommands whose --help is printed from a file generated from their parser, and the width it
# is wrapped to.
STORED_HELP = ("train",)
HELP_DIR = Path(__file__).with_name("help")
HELP_COLUMNS = 100


def _chosen_subcommand(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _add_subcommand(subparsers, name: str, module: str, help_text: str) -> None:
    """The subcommand's own parser, from its module; a module that cannot be imported gets a
    parser that says why."""
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``argv``: the full parser of the subcommand it names, a one-line entry for
    every other one."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pyalign", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen_subcommand(argv)
    for name, module, help_text in SUBCOMMANDS:
        if name == chosen:
            _add_subcommand(subparsers, name, module, help_text)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def live_help(name: str) -> str:
    """The help the subcommand's parser prints, wrapped to HELP_COLUMNS."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # argparse wraps to $COLUMNS
    try:
        parser = build_parser([name])
        return parser._subparsers._group_actions[0].choices[name].format_help()
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def write_stored_help() -> None:
    HELP_DIR.mkdir(exist_ok=True)
    for name in STORED_HELP:
        (HELP_DIR / f"{name}.txt").write_text(live_help(name))


def _stored_help(argv: list[str]) -> str | None:
    """The stored help text when ``argv`` asks for a STORED_HELP subcommand's help."""
    chosen = _chosen_subcommand(argv)
    if chosen in STORED_HELP and any(arg in ("-h", "--help") for arg in argv):
        path = HELP_DIR / f"{chosen}.txt"
        if path.is_file():
            return path.read_text()
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--write-help"]:  # maintainers: regenerate pyalign/cli/help/
        write_stored_help()
        return 0
    stored = _stored_help(argv)
    if stored is not None:
        sys.stdout.write(stored)
        return 0
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)
