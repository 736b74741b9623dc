"""`pyalign train`: preference and RL training on the embedded task, or on your own model and data.

    pyalign train --algo tr-dpo --model DIR --data prefs.jsonl --lr 1e-6 --beta 0.1 --num-epochs 1
    pyalign train --algo grpo --model DIR --data prompts.jsonl --reward reward.py:score
    pyalign train --algo kto --model DIR --data prefs.jsonl        # pairs: one good, one bad row each
    pyalign train --algo tr-dpo --steps 100 --out runs/tr-dpo      # the embedded task
    pyalign train --out runs/tr-dpo --resume                        # continue, with the run's settings
    torchrun --nproc-per-node 2 -m pyalign.cli train --algo dpo     # DDP (gloo on CPU)

Every setting is a flag (TRL's names too: --learning-rate, --per-device-batch-size,
--gradient-accumulation-steps, --num-train-epochs, --max-steps, --num-generations...) and a
config-file key (--config run.toml: flat key = value pairs, flags override them);
--print-config prints the resolved settings as such a file. Defaults: on the embedded task its
tuned values (a run of about a minute on 2 CPU cores); with --model, TRL 1.16's defaults for
the algorithm (pyalign/trainers/preference.py and rl.py say which), evaluation off unless
--eval-data, and steps = rows x epochs / batch.

With --data (pyalign.data) the run trains the --model causal LM on the file's rows in TRL's
dataset formats (preference, unpaired for KTO (which takes pairs too), prompt-only with --reward
for RL). --reward is path/to/file.py:function, module:function (a module of the working
directory too) or a reward-model directory; the function is called with prompts=[...],
completions=[...] and returns one float per completion. ``--lora r=16,alpha=32`` trains a peft
LoRA adapter on the frozen model.

Writes metrics.jsonl (and, with --report-to, TensorBoard event files or a W&B run),
reward_vs_kl.png and checkpoints/ under --out; each checkpoint stores the run's settings, so
``--out DIR --resume`` continues with them (an option given must match them) and ``pyalign
export OUT --out DIR`` writes the trained policy as a transformers model. Checkpoints are
periodic (every 50 steps and every 10 minutes). Ctrl-C (or SIGTERM) finishes the current step,
writes a checkpoint, says how to resume and exits 130 (143); a second Ctrl-C stops at once.
--out holds one run at a time (OUT/.lock). Every key is checked before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Optional

from pyalign.trainers.fields import as_field_type, declared, field_types
from pyalign.trainers.presets import ALGOS
from pyalign.trainers.settings import ConfigError, RunSettings, load_config_file, printed_settings
from pyalign.trainers.trainer import TrainerConfig

CLI_ONLY = ("config", "resume", "overwrite", "print_config")


def _option_owners() -> dict:
    """option name -> [(group, field name, field, type)] over the run's settings and every
    family's config: each field's name and aliases (one option each)."""
    owners: dict = {}
    classes = [("run", RunSettings), ("every algorithm", TrainerConfig)]
    classes += [(f"{a.family} algorithms", a.config_class) for a in ALGOS.values()]
    for group, cls in classes:
        hints = field_types(cls)
        for name, field in declared(cls).items():
            for option in (name, *field.metadata["aliases"]):
                entry = (group, name, field, hints[name])
                if all(owner[1:3] != entry[1:3] for owner in owners.get(option, [])):
                    owners.setdefault(option, []).append(entry)
    return owners


def _argument(option: str, owners: list) -> dict:
    group, name, field, expected = owners[0]
    kinds = [as_field_type([], t)[0] for _, _, _, t in owners]  # does it take a list?
    helps = []
    for owner_group, owner_name, owner_field, _ in owners:
        own = owner_field.metadata["help"] if owner_name == option else \
            f"TRL's name of --{owner_name.replace('_', '-')}"
        choices = owner_field.metadata["choices"]
        if owner_name == option and choices and option != "algo":
            own += f" (one of {', '.join(map(str, choices))})"
        helps.append(f"{owner_group}: {own}" if len(owners) > 1 else own)
    kwargs = {"dest": option, "default": argparse.SUPPRESS, "help": " | ".join(helps)}
    base = [t for t in typing.get_args(expected) if t is not type(None)] or [expected]
    if base[0] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif any(kinds):
        kwargs.update(nargs="+", type=field.metadata["item_type"] or str)
    else:
        kwargs["type"] = base[0]
    if option == "algo":
        kwargs["choices"] = list(ALGOS)
    return kwargs


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML (or YAML) file of key = value settings")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in --out (or CHECKPOINT) with its stored settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds checkpoints (deletes them)")
    parser.add_argument("--print-config", action="store_true", dest="print_config",
                        help="print the resolved settings as a config file and exit")
    groups = {}
    for option, owners in _option_owners().items():
        group = owners[0][0] if len({o[0] for o in owners}) == 1 else "several families"
        if group not in groups:
            groups[group] = parser.add_argument_group(f"settings: {group}")
        flag = "--" + option.replace("_", "-")
        groups[group].add_argument(flag, **_argument(option, owners))


def given_on_command_line(args: argparse.Namespace) -> dict:
    """The settings given as flags: a one-item list becomes its item where a setting takes one."""
    owners = _option_owners()
    given = {}
    for key, value in vars(args).items():
        if key in CLI_ONLY or key not in owners:
            continue
        if isinstance(value, list) and len(value) == 1 and \
                any(as_field_type(value[0], t)[0] for *_, t in owners[key]):
            value = value[0]
        given[key] = value
    return given


def resolve_settings(args: argparse.Namespace, stored: Optional[dict] = None):
    """(algo, run settings, trainer config) of parsed arguments: defaults < --config < flags."""
    from pyalign.trainers.resolve import resolve
    sources = [(args.config, load_config_file(args.config))] if args.config else []
    return resolve(sources + [("command line", given_on_command_line(args))], stored=stored)


def _stored_settings(args: argparse.Namespace):
    """For --resume: (the stored settings of the checkpoint to continue, or None, a notice)."""
    from pyalign.trainers.checkpoint import read_settings, resolve_resume_path
    if not args.resume:
        return None, None
    given = given_on_command_line(args)
    file_values = load_config_file(args.config) if args.config else {}
    out = next((values[k] for values in (given, file_values) for k in ("out", "output_dir")
                if values.get(k)), None)
    algo = given.get("algo") or file_values.get("algo")
    if out is None and args.resume not in ("", "latest"):  # OUT/checkpoints/step-NNNNNN.pt
        out = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    out = out or (os.path.join("runs", algo) if algo in ALGOS else None)
    if out is None:
        raise ConfigError("--resume needs --out DIR: the directory of the run to continue")
    resume, notice = _resume_decision(out, args.resume)
    if resume is None:
        return None, notice
    path = resolve_resume_path(resume, os.path.join(out, "checkpoints"))
    stored = read_settings(path)
    if not stored["run"].get("algo"):  # written by a trainer built in Python: no run settings
        return None, notice
    return dict(stored, path=path), notice


def _resume_decision(out: str, resume) -> tuple[Optional[str], Optional[str]]:
    """(what to resume, a notice). ``--resume`` into a directory where a run started but was
    killed before its first complete checkpoint (its lock, metrics or checkpoint folder are
    there) starts from scratch, with a notice; into a directory with no trace of a run it is an
    error (most likely a wrong --out)."""
    from pyalign.trainers.checkpoint import CheckpointError, list_checkpoints
    from pyalign.trainers.lock import LOCK_NAME
    if resume not in ("", "latest"):
        return resume, None
    checkpoints = os.path.join(out, "checkpoints")
    if list_checkpoints(checkpoints):
        return resume, None
    traces = [name for name in (LOCK_NAME, "metrics.jsonl", "checkpoints")
              if os.path.exists(os.path.join(out, name))]
    if not traces:
        raise CheckpointError(f"--resume: no checkpoint (step-NNNNNN.pt) in {checkpoints}, and no "
                              f"run was started in {out}")
    return None, (f"pyalign train: notice: --resume: no complete checkpoint in {checkpoints} (the "
                  f"run there stopped before its first one); starting from scratch")


def _prepare_out_dir(run: dict, resume, overwrite: bool, is_main: bool) -> None:
    from pyalign.trainers.checkpoint import list_checkpoints
    out = run["out"]
    checkpoints = list_checkpoints(os.path.join(out, "checkpoints"))
    if resume or not checkpoints:
        return
    if not overwrite:
        raise ConfigError(f"{out} already holds checkpoints of an earlier run ({checkpoints[-1][1]}); "
                          f"pass --resume to continue it, --overwrite to start again, or another --out")
    if is_main:
        for _, path in checkpoints:
            os.remove(path)


def describe(algo: str, run: dict, config) -> str:
    """One line saying what the run will do (data, examples, epochs, steps, batch, learning rate)."""
    family = ALGOS[algo].family
    source = run["data"] or "the embedded task"
    unit = "examples" if family == "preference" else "prompts"
    parts = [f"pyalign train: {algo} on {source}"]
    if family == "preference":
        epochs = run["steps"] * config.batch_size / config.num_examples
        parts.append(f"{config.num_examples} {unit}, {run['steps']} steps = {epochs:.3g} "
                     f"epoch{'' if epochs == 1 else 's'}")
    else:
        parts.append(f"{run['steps']} steps")
    parts.append(f"batch {config.batch_size} {unit} (micro-batch {config.micro_batch_size})")
    parts.append(f"lr {config.lr:g} {config.lr_scheduler_type}")
    if family == "preference":
        parts.append(f"beta {config.beta:g}")
    else:
        parts.append(f"{config.samples_per_prompt} samples per prompt, kl_coef {config.kl_coef:g}")
    parts.append(f"evaluation every {config.eval_every} steps" if config.eval_every else "no evaluation")
    return ", ".join(parts) + f"; out {run['out']}"


def run_train(args: argparse.Namespace) -> int:
    from pyalign.data import DataError
    from pyalign.data.rewards import RewardError
    from pyalign.trainers.checkpoint import CheckpointError
    try:
        stored, notice = _stored_settings(args)
        algo, run, config = resolve_settings(args, stored)
    except (ConfigError, CheckpointError, DataError, RewardError) as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    if run.get("study"):  # a `pyalign study` point: trained and evaluated by pyalign.study
        from pyalign.study.point import run_point
        return run_point(algo, run, config)
    if args.print_config:
        print(f"# pyalign train --algo {algo}: the keys a config file may set, resolved (TOML: "
              f"save it and pass --config FILE)")
        print("\n".join(printed_settings(algo, run, config)))
        return 0
    try:
        return _train(args, algo, run, config, stored, notice)
    except (ConfigError, CheckpointError, DataError, RewardError) as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyalign train: stopped at once; --resume continues from the newest checkpoint in "
              f"{os.path.join(run['out'], 'checkpoints')}", file=sys.stderr, flush=True)
        return 130


def _train(args, algo: str, run: dict, config, stored: Optional[dict], notice) -> int:
    """Lock --out, build the trainer, train (stopping cleanly on a signal); the exit code."""
    import torch

    from pyalign._prepare import prepare_run
    from pyalign.trainers.build import build_trainer, set_threads
    from pyalign.trainers.distributed import init_distributed
    from pyalign.trainers.lock import LockHeld, RunLock, remove_stale_temporaries
    from pyalign.trainers.stop import StopSignals
    from pyalign.trainers.tracking import open_trackers
    dist_ctx = init_distributed()
    lock, trackers, stop = None, [], StopSignals()
    resume = stored["path"] if stored else None
    try:
        dist_ctx.barrier()  # every rank has looked at --out before rank 0 locks it
        failure = None
        if dist_ctx.is_main:  # one lock per run: rank 0 takes it for all ranks
            try:
                lock = RunLock(run["out"]).acquire()
            except LockHeld as exc:
                failure = str(exc)
            except OSError as exc:
                failure = f"key 'out' must be a writable directory, got {run['out']!r}: {exc}"
        if float(dist_ctx.all_reduce_sum(torch.tensor([1.0 if failure else 0.0], device=dist_ctx.device))[0]):
            raise ConfigError(failure or f"rank 0 could not lock {run['out']}")
        if dist_ctx.is_main:
            remove_stale_temporaries(run["out"], os.path.join(run["out"], "checkpoints"))
            for line in filter(None, (notice, describe(algo, run, config))):
                print(line, file=sys.stderr, flush=True)
            if stored:
                print(f"pyalign train: resuming from step {stored['step']} of {run['steps']} "
                      f"({stored['path']})", file=sys.stderr, flush=True)
        _prepare_out_dir(run, resume, args.overwrite, dist_ctx.is_main)
        on_cpu = dist_ctx.device.type == "cpu"
        set_threads(run["threads"], on_cpu and not run["model"])
        # the builds (C++ extension, embedded task) before the bar and step 1's clock
        prepare_run(dist_ctx.device, config.backend, progress=config.progress,
                    task_seed=None if run.get("data") else run["task_seed"],
                    task_config=run.get("task"), task_cache_dir=run["task_cache_dir"],
                    main_process=dist_ctx.is_main)
        trainer = build_trainer(algo, run, config, dist_ctx=dist_ctx, progress=config.progress)
        set_threads(run["threads"], on_cpu, trainer.policy)
        if dist_ctx.is_main:
            settings = {"run": run, "config": dataclasses.asdict(trainer.config)}
            trackers = open_trackers(run["report_to"], run["out"], settings,
                                     stored["step"] if stored else None)
        with stop:
            summary = trainer.train(run["steps"], resume=resume, stop=stop, trackers=trackers)
    finally:
        for tracker in trackers:
            tracker.close()
        if lock is not None:
            lock.release()
        dist_ctx.close()
    if dist_ctx.is_main:
        _report(summary, run)
    return (stop.exit_code or 130) if summary.get("interrupted") else 0


def _report(summary: dict, run: dict) -> None:
    from pyalign.trainers.metrics import format_summary
    if summary.get("interrupted"):
        print(f"pyalign train: {summary['interrupted']}: stopped after step {summary['steps']} of "
              f"{summary['total_steps']}, checkpoint {summary['checkpoint']}; resume with: "
              f"pyalign train --out {run['out']} --resume", file=sys.stderr, flush=True)
        return
    if summary.get("metrics") and not summary.get("plot"):
        has_reward = "gold_reward" in summary.get("last_step", {}) or \
            "proxy_reward" in summary.get("last_step", {}) or "gold_reward" in summary
        why = ("no evaluation during training (eval_every = 0): the plot needs at least one "
               "besides the final one" if has_reward
               else "this run has no gold or proxy reward (user data without --reward)")
        print(f"pyalign train: note: no reward_vs_kl.png: {why}", file=sys.stderr, flush=True)
    print(format_summary(summary), flush=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``train`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser("train", help="train on your model and data or the embedded task "
                                   f"({', '.join(ALGOS)})", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pyalign.cli.train ...``: the same as ``pyalign train ...``."""
    parser = argparse.ArgumentParser(prog="pyalign train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
