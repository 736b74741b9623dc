"""pyalign.integrations.trl: enable()/disable() swap TRL 1.16's fused LM head for pyalign's and
back, and TRL's DPO, KTO and GRPO trainers log the same losses and metrics either way."""
import logging
import math
import subprocess
import sys

import pytest
import torch

import pyalign.integrations.trl as pyalign_trl
from hf_models import save_tiny_model, train_tokenizer

trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed ([test] extra)")

TRAINER_MODULES = ("sft_trainer", "dpo_trainer", "kto_trainer", "grpo_trainer", "rloo_trainer")
# Wall-clock entries of the log, which differ between any two runs.
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(autouse=True)
def _disabled_after():
    yield
    pyalign_trl.disable()


def _trainer_lookups():
    import importlib
    return [importlib.import_module(f"trl.trainer.{name}").add_fused_lm_head
            for name in TRAINER_MODULES]


def test_enable_disable_swap_the_names_the_trainers_look_up_idempotently():
    trls_head, trls_kernel = trl_utils.add_fused_lm_head, trl_utils._ChunkedLogProbFunction
    assert not pyalign_trl.is_enabled()
    for _ in range(2):
        pyalign_trl.enable()
        assert pyalign_trl.is_enabled()
        heads = {trl_utils.add_fused_lm_head, *_trainer_lookups()}
        assert len(heads) == 1 and trls_head not in heads
        assert trl_utils._ChunkedLogProbFunction is pyalign_trl.ChunkedLogProbFunction
        from trl.trainer import add_fused_lm_head  # the lazily exported name too
        assert add_fused_lm_head in heads
    for _ in range(2):
        pyalign_trl.disable()
        assert not pyalign_trl.is_enabled()
        assert {trl_utils.add_fused_lm_head, *_trainer_lookups()} == {trls_head}
        assert trl_utils._ChunkedLogProbFunction is trls_kernel
    with pyalign_trl.enabled():
        assert pyalign_trl.is_enabled()
    assert not pyalign_trl.is_enabled()


def test_enable_and_disable_each_log_one_line_naming_what_they_replaced(caplog):
    with caplog.at_level(logging.INFO, logger="pyalign"):
        pyalign_trl.enable()
        pyalign_trl.enable()                     # already enabled: nothing done, nothing said
        pyalign_trl.disable()
        pyalign_trl.disable()
    (enabled, disabled) = [r for r in caplog.records if r.name.startswith("pyalign")]
    assert enabled.levelno == disabled.levelno == logging.INFO
    for record, verb in ((enabled, "replaced"), (disabled, "restored")):
        text = record.getMessage()
        assert verb in text and "_ChunkedLogProbFunction (in trl.trainer.utils)" in text, text
        for name in ("utils", *TRAINER_MODULES):
            assert f"trl.trainer.{name}" in text, text


def test_the_log_lines_reach_stderr_when_the_program_configured_no_logging():
    code = "import pyalign.integrations.trl as t\nt.enable()\nt.disable()\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("pyalign: ")]
    assert len(lines) == 2 and "replaced" in lines[0] and "restored" in lines[1], result.stderr


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


PROMPTS = ["the cat", "a dog ran", "big red", "one two"]
COMPLETIONS = [" sat on the mat", " under the log", " sun", " three four"]


def _common(tmp_path):
    # fp32 (TRL's configs default to bf16 autocast, where the two heads round differently).
    # SGD, not Adam: Adam's first step divides by |g|, so a 1e-7 gradient difference on a
    # near-zero entry becomes a full-size step and the second step's metrics no longer compare.
    return dict(output_dir=str(tmp_path), report_to="none", max_steps=2,
                per_device_train_batch_size=2, optim="sgd", learning_rate=0.1, logging_steps=1,
                save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)


def _reward_length(completions, **kwargs):
    return [len(completion) / 10 for completion in completions]


def _run(name, model_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer

    common = _common(tmp_path)
    if name == "dpo":
        data = Dataset.from_dict({"prompt": PROMPTS, "chosen": COMPLETIONS,
                                  "rejected": COMPLETIONS[1:] + COMPLETIONS[:1]})
        trainer = DPOTrainer(model=model_dir, args=DPOConfig(**common, max_length=32),
                             train_dataset=data, processing_class=tokenizer)
    elif name == "kto":
        data = Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS,
                                  "label": [True, False, True, False]})
        trainer = KTOTrainer(model=model_dir, args=KTOConfig(**common, max_length=32),
                             train_dataset=data, processing_class=tokenizer)
    else:  # grpo; grpo_fp32_head with TRL's cast_lm_head_to_fp32
        data = Dataset.from_dict({"prompt": PROMPTS})
        args = GRPOConfig(**common, num_generations=2, max_completion_length=6, beta=0.1,
                          cast_lm_head_to_fp32=name == "grpo_fp32_head")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=_reward_length, args=args,
                              train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "kto", "grpo", "grpo_fp32_head"])
def test_trainer_logs_the_same_with_and_without_pyalign(name, llama_dir, tokenizer, tmp_path,
                                                       monkeypatch):
    """Each trainer's log, TRL's fused head against pyalign's; GRPO's ``cast_lm_head_to_fp32``
    reaches pyalign's kernel as its fp32 head (head_dtype=float32)."""
    import pyalign.integrations.transformers as hf

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("head_dtype"))
        return linear_token_logprobs(*args, **kwargs)

    linear_token_logprobs = hf.linear_token_logprobs
    monkeypatch.setattr(hf, "linear_token_logprobs", counted)
    trls_log = _run(name, llama_dir, tokenizer, tmp_path / "trl")
    assert not calls
    with pyalign_trl.enabled():
        ours_log = _run(name, llama_dir, tokenizer, tmp_path / "pyalign")
    assert calls  # the trainer's fused head ran on pyalign's kernel
    head_dtype = torch.float32 if name == "grpo_fp32_head" else None
    assert set(calls) == {head_dtype}
    assert len(ours_log) == len(trls_log) == 3  # two steps and the summary
    assert "loss" in trls_log[0] and "logps/chosen" in trls_log[0] or "entropy" in trls_log[0]
    for ours, theirs in zip(ours_log, trls_log, strict=True):
        assert ours.keys() == theirs.keys()
        for key in theirs.keys() - set(TIMINGS):
            assert math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-5), (key, ours,
                                                                                     theirs)


def test_kernel_stand_in_matches_trls_chunked_logprob_function():
    from trl.kernels import ChunkedLogProbFunction as TRLs

    hidden = torch.randn(13, 24, dtype=torch.float64)
    weight = torch.randn(203, 24, dtype=torch.float64)  # V not a multiple of any tile
    bias = torch.randn(203, dtype=torch.float64)
    targets = torch.randint(0, 203, (13,))
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    for function in (pyalign_trl.ChunkedLogProbFunction, TRLs):
        leaves = [t.clone().float().requires_grad_() for t in (hidden, weight, bias)]
        got = function.apply(*leaves, targets, 0.7, 64, 3.0, 0.5, outputs)
        (got[0] * torch.linspace(-1, 2, 13)).sum().add(got[1].sum()).backward()
        results.append((*got, *(leaf.grad for leaf in leaves)))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_kernel_stand_in_runs_an_fp32_hidden_state_on_a_bf16_head_as_trls():
    """TRL's cast_lm_head_to_fp32 forward hands the kernel an fp32 hidden state; with a bf16 head
    TRL upcasts the weight slice by slice, the stand-in runs pyalign's fp32 head (head_dtype):
    the same outputs to fp32 accuracy, the bf16 head's gradient one rounding apart."""
    from trl.kernels import ChunkedLogProbFunction as TRLs

    hidden = torch.randn(13, 24)
    weight = torch.randn(203, 24).bfloat16()
    bias = torch.randn(203).bfloat16()
    targets = torch.randint(0, 203, (13,))
    results = []
    for function in (pyalign_trl.ChunkedLogProbFunction, TRLs):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        got = function.apply(*leaves, targets, 0.7, 64, 3.0, 0.5, ("log_probs", "entropy"))
        (got[0] * torch.linspace(-1, 2, 13)).sum().add(got[1].sum()).backward()
        results.append((got[0], got[1], *(leaf.grad for leaf in leaves)))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=2 ** -7 if ours.dtype ==
                                   torch.bfloat16 else 1e-5)
