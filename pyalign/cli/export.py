"""`pyalign export`: a trained run's policy as a transformers model directory.

    pyalign export runs/tr-dpo --out exported/tr-dpo              # the newest checkpoint
    pyalign export runs/lora --out exported/adapter --lora-mode adapter --step 200

Loads the newest (or ``--step N``) checkpoint of RUN_DIR/checkpoints, verified
(``pyalign.trainers.load_checkpoint``), rebuilds the policy from the run settings stored in it
(``"run"``: the ``--model`` directory's model, or the embedded task's Llama from the run's
``[task]`` sizes; then the ``--lora`` adapter) and writes it with ``save_pretrained``, so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it. A LoRA run is written merged
(``--lora-mode merged``, the default: the adapter folded into the weights, a plain model) or as
the adapter (``--lora-mode adapter``: peft's adapter files, whose ``base_model_name_or_path`` is
the base model directory, made absolute; ``PeftModel.from_pretrained(base, OUT)`` or
``AutoPeftModelForCausalLM.from_pretrained(OUT)`` loads it). The embedded task has no base model
on disk, so there the base goes to OUT/base and the adapter points at it.

The tokenizer written beside the model: the model directory's; for the embedded task (or a model
directory without one, trained on the task) a word-level tokenizer of the task's 64 tokens:
``<pad> <bos> <eos>`` then each grammar category's words (``det0``..``det5``, ``adj0``, ...,
``stop1``), space-separated. OUT is written in a temporary directory beside it and renamed
into place, so a failed export leaves nothing half-written; an OUT that exists and is not empty
needs ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional

LORA_MODES = ("merged", "adapter")
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """A run directory, checkpoint or output directory that cannot be exported (or into)."""


def find_checkpoint(run_dir: str, step: Optional[int]) -> str:
    """The checkpoint file of ``run_dir`` at ``step`` (None: the newest)."""
    from pyalign.trainers.checkpoint import list_checkpoints
    if not os.path.isdir(run_dir):
        raise ExportError(f"run directory {run_dir} does not exist")
    directory = os.path.join(run_dir, "checkpoints")
    found = dict(list_checkpoints(directory))
    if not found:
        raise ExportError(f"no checkpoint (step-NNNNNN.pt) in {directory}: is {run_dir} the --out "
                          f"of a pyalign train run?")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise ExportError(f"no checkpoint of step {step} in {directory}; it holds steps "
                          f"{', '.join(map(str, sorted(found)))}")
    return found[step]


def task_tokenizer():
    """A ``PreTrainedTokenizerFast`` of the embedded task's vocabulary (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pyalign.tasks import language
    names = {language.PAD_ID: "<pad>", language.BOS_ID: "<bos>", language.EOS_ID: "<eos>"}
    for category, ids in language.category_token_ids().items():
        if category not in (language.START, language.SPECIAL):
            names.update({token: f"{category}{i}" for i, token in enumerate(ids)})
    if sorted(names) != list(range(language.VOCAB_SIZE)):
        raise RuntimeError("pyalign.tasks.language's token layout is not pad, bos, eos, categories")
    # The language has no unknown token: encoding a word outside it is an error, never an id.
    tokenizer = Tokenizer(models.WordLevel({name: token for token, name in names.items()}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decoding joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", model_max_length=None)


def _base_model(run: dict, model_dir: Optional[str]):
    """The untrained model the run started from, in float32 (as pyalign train loads it)."""
    if model_dir:
        from transformers import AutoModelForCausalLM
        if not os.path.isdir(model_dir):
            raise ExportError(f"the run's model directory {model_dir} does not exist; pass --model "
                              f"DIR (the directory the run was trained from)")
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).float()
        except Exception as exc:
            raise ExportError(f"cannot load the model of {model_dir}: {exc}") from exc
    from transformers import LlamaForCausalLM

    from pyalign.tasks import TaskConfig
    from pyalign.tasks.task import _model_config  # the task policy's Llama config, from its sizes
    return LlamaForCausalLM(_model_config(TaskConfig(**run.get("task", {}))))


def rebuild_policy(payload: dict, path: str, model_dir: Optional[str] = None):
    """The trained policy of a loaded checkpoint (a PeftModel for a LoRA run), in float32."""
    run = payload.get("run") or {}
    if "algo" not in run and not model_dir:
        raise ExportError(f"checkpoint {path} stores no run settings (its trainer was built in "
                          f"Python, not by pyalign train): pass --model DIR, the model it trained")
    model = _base_model(run, model_dir or run.get("model"))
    if run.get("lora"):
        from pyalign.integrations.lora import apply_lora
        model = apply_lora(model, run["lora"])
    # the checkpoint holds the trainer's scorer module, whose ``model`` is the policy
    prefix = "model."
    state = {name[len(prefix):]: tensor for name, tensor in payload["policy"].items()
             if name.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"checkpoint {path} does not match the model rebuilt from its run "
                          f"settings: {exc}") from exc
    return model.eval()


def _tokenizer(run: dict, model_dir: Optional[str]):
    """(tokenizer or None, where it came from)."""
    if model_dir:
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(model_dir, local_files_only=True), model_dir
        except Exception:  # no tokenizer files there: the task's, if the run trained on the task
            if run.get("data"):
                return None, f"none: {model_dir} has no tokenizer"
    return task_tokenizer(), "the embedded task's vocabulary"


def _overlap(a: str, b: str) -> bool:
    """Whether the directories ``a`` and ``b`` are one, or one lies inside the other."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _prepare_out(out: str, overwrite: bool, inputs: list[str]) -> str:
    """A fresh temporary directory beside ``out`` (renamed to it once complete). ``out`` may not
    be, hold or lie inside one of the ``inputs`` directories: --overwrite would delete them, or
    the export would write into what it reads."""
    final = os.path.realpath(out)
    hits = [d for d in inputs if _overlap(final, os.path.realpath(d))]
    if hits:  # named by the one it is, if any
        directory = next((d for d in hits if os.path.realpath(d) == final), hits[0])
        source = os.path.realpath(directory)
        where = "is" if source == final else "holds" if source.startswith(final) else "lies inside"
        raise ExportError(f"--out {out} {where} {directory}, which the export reads; choose a "
                          f"directory outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.",
                            suffix=".tmp")


def export_run(run_dir: str, out: str, *, step: Optional[int] = None, lora_mode: Optional[str] = None,
               dtype: str = "float32", overwrite: bool = False, model_dir: Optional[str] = None) -> dict:
    """Write the policy of ``run_dir``'s checkpoint to ``out`` (see the module docstring);
    returns what was written. ``lora_mode`` None is "merged". Raises ExportError /
    CheckpointError with a clear message."""
    import torch

    from pyalign.trainers.checkpoint import load_checkpoint
    if lora_mode is not None and lora_mode not in LORA_MODES:
        raise ExportError(f"--lora-mode must be one of {LORA_MODES}, got {lora_mode!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    path = find_checkpoint(run_dir, step)
    payload = load_checkpoint(path)
    run = payload.get("run") or {}
    if lora_mode == "adapter" and not run.get("lora"):
        raise ExportError(f"--lora-mode adapter: the run of {path} trained the whole model, not a "
                          f"LoRA adapter (no --lora); export it without --lora-mode")
    model_dir = model_dir or run.get("model")
    policy = rebuild_policy(payload, path, model_dir)
    tokenizer, tokenizer_source = _tokenizer(run, model_dir)
    final = os.path.abspath(out)
    staging = _prepare_out(out, overwrite, [run_dir, os.path.join(run_dir, "checkpoints")]
                           + ([model_dir] if model_dir else []))
    try:
        written = {"checkpoint": path, "step": int(payload["step"]), "out": out,
                   "tokenizer": tokenizer_source}
        if run.get("lora") and lora_mode == "adapter":
            base_dir = os.path.abspath(model_dir) if model_dir else os.path.join(final, "base")
            policy.peft_config["default"].base_model_name_or_path = base_dir
            policy.to(getattr(torch, dtype)).save_pretrained(staging)
            if not model_dir:  # the embedded task's base exists only in the checkpoint
                base = policy.unload()
                base.save_pretrained(os.path.join(staging, "base"))
                tokenizer.save_pretrained(os.path.join(staging, "base"))
            written.update(lora_mode="adapter", base=base_dir)
        else:
            if run.get("lora"):
                policy = policy.merge_and_unload()  # in float32, then cast
                written["lora_mode"] = "merged"
            policy.to(getattr(torch, dtype)).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def run_export(args: argparse.Namespace) -> int:
    from pyalign.trainers.checkpoint import CheckpointError
    try:
        written = export_run(args.run_dir, args.out, step=args.step, lora_mode=args.lora_mode,
                             dtype=args.dtype, overwrite=args.overwrite, model_dir=args.model)
    except (ExportError, CheckpointError) as exc:
        print(f"pyalign export: error: {exc}", file=sys.stderr)
        return 2
    print("pyalign export: " + " ".join(f"{k}={v}" for k, v in written.items()), flush=True)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of a pyalign train run")
    parser.add_argument("--out", required=True, help="the directory to write the model into")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--lora-mode", dest="lora_mode", choices=LORA_MODES,
                        help="a LoRA run: the adapter merged into the weights (the default), or the "
                             "adapter files")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the weights' dtype on disk (default %(default)s)")
    parser.add_argument("--model", help="the base model directory, where the run's (stored in the "
                        "checkpoint) has moved")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``export`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser("export", help="write a run's policy as a transformers model "
                                   "(save_pretrained)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.set_defaults(func=run_export)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pyalign.cli.export ...``: the same as ``pyalign export ...``."""
    parser = argparse.ArgumentParser(prog="pyalign export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
