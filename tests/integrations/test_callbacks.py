"""TrustRegionCallback, ElasticResetCallback and BEMACallback driven by a real
transformers.Trainer (and TRL's DPOTrainer) on a tiny Llama: the reference / EMA / BEMA weights
follow an independent float64 computation of the schedule from the recorded policy weights, and a
run resumed from a checkpoint is bit-identical to a straight one. BEMACallback also gives the
same weights as TRL 1.16's own BEMACallback run on another copy of the model with the same
updates (in TRL's running-model mode and written into a reference model)."""
import copy
import shutil

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_models import tiny_config
from pyalign.integrations.callbacks import (
    STATE_FILES,
    BEMACallback,
    ElasticResetCallback,
    TrustRegionCallback,
    use_reference_adapter,
)
from support import bema_trajectory64

VOCAB = 64
STEPS = 6
SAVE_EVERY = 3


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, hidden=16, layers=1)).float()


def lora_llama(seed: int):
    from peft import LoraConfig, get_peft_model
    model = tiny_llama(seed)
    torch.manual_seed(seed + 100)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        task_type="CAUSAL_LM", init_lora_weights="gaussian")
    return get_peft_model(model, config)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences (a causal-LM dataset made here), the labels masked on a prefix."""

    def __init__(self, rows: int = 24, length: int = 10, seed: int = 7):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        labels = self.input_ids[index].clone()
        labels[:2] = -100
        return {"input_ids": self.input_ids[index], "labels": labels}


class Recorder(TrainerCallback):
    """float64 copies of some tensors at the end of every step (where it sits in the callback
    list decides whether it sees them before or after the callback under test)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.steps: dict[int, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {n: t.detach().double().clone()
                                         for n, t in self.tensors.items()}


def training_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4,
                    learning_rate=2e-2, save_strategy="steps", save_steps=SAVE_EVERY,
                    report_to="none", logging_steps=1000, disable_tqdm=True, seed=0, use_cpu=True,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def run_trainer(model, callbacks, output_dir, resume=None, **overrides):
    trainer = Trainer(model=model, args=training_args(output_dir, **overrides),
                      train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def exact(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_bits_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def lerp_oracle(ref0: dict, policy_at: dict, alpha: float, tau: int) -> dict:
    """step -> the float64 reference after that step, from the recorded policy weights."""
    ref = dict(ref0)
    trajectory = {}
    for step in sorted(policy_at):
        if step % tau == 0:
            ref = {n: alpha * policy_at[step][n] + (1 - alpha) * ref[n] for n in ref}
        trajectory[step] = ref
    return trajectory


def params64(tensors: dict) -> dict:
    return {n: t.detach().double().clone() for n, t in tensors.items()}


def assert_close64(got: dict, want: dict):
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- trust region, full reference

@pytest.fixture(scope="module")
def straight_trust_region(tmp_path_factory):
    """Six steps straight (checkpoints at 3 and 6), the policy recorded before the callback and
    the reference after it at every step."""
    out = tmp_path_factory.mktemp("tr_straight")
    policy, ref = tiny_llama(0), tiny_llama(1)
    ref0 = params64(dict(ref.named_parameters()))
    policy_seen = Recorder(dict(policy.named_parameters()))
    ref_seen = Recorder(dict(ref.named_parameters()))
    callback = TrustRegionCallback(ref, alpha=0.6, tau=2)
    run_trainer(policy, [policy_seen, callback, ref_seen], out)
    return dict(dir=out, policy=exact(policy), ref=exact(ref), ref0=ref0, callback=callback,
                policy_seen=policy_seen.steps, ref_seen=ref_seen.steps)


def test_trust_region_reference_follows_the_lerp_schedule(straight_trust_region):
    run = straight_trust_region
    oracle = lerp_oracle(run["ref0"], run["policy_seen"], alpha=0.6, tau=2)
    assert sorted(run["ref_seen"]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert_close64(run["ref_seen"][step], oracle[step])
    assert run["callback"].strategy.num_updates == STEPS // 2
    # the state file holds the reference of its step and opens with weights_only=True
    saved = torch.load(run["dir"] / f"checkpoint-{SAVE_EVERY}" / f"{STATE_FILES['TrustRegion']}.pt",
                       weights_only=True)
    assert saved["global_step"] == SAVE_EVERY and saved["last_update_step"] == 2
    assert_close64(saved["ref"], oracle[SAVE_EVERY])


@pytest.mark.parametrize("how", ["last", "path", "outside"])
def test_trust_region_resume_is_bit_identical(straight_trust_region, tmp_path, how):
    run = straight_trust_region
    straight_dir, policy_want, ref_want = run["dir"], run["policy"], run["ref"]
    checkpoint = straight_dir / f"checkpoint-{SAVE_EVERY}"
    overrides = {}
    if how == "last":          # train(resume_from_checkpoint=True): the last checkpoint of output_dir
        output_dir, resume = tmp_path / "run", True
        shutil.copytree(checkpoint, output_dir / checkpoint.name)
    elif how == "path":        # an explicit checkpoint of the same output_dir
        output_dir, resume = tmp_path / "run", str(tmp_path / "run" / checkpoint.name)
        shutil.copytree(checkpoint, resume)
    else:                      # a checkpoint elsewhere, named in TrainingArguments too
        output_dir, resume = tmp_path / "run", str(checkpoint)
        overrides["resume_from_checkpoint"] = resume
    # fresh models: everything the resumed run knows comes from the checkpoint
    policy, ref = tiny_llama(0), tiny_llama(1)
    callback = TrustRegionCallback(ref, alpha=0.6, tau=2)
    run_trainer(policy, [callback], output_dir, resume=resume, **overrides)
    assert_bits_equal(exact(policy), policy_want)
    assert_bits_equal(exact(ref), ref_want)
    assert callback.strategy.num_updates == STEPS // 2
    assert callback.strategy.last_update_step == STEPS


def test_resume_without_the_state_file_raises(straight_trust_region, tmp_path):
    straight_dir = straight_trust_region["dir"]
    policy, ref = tiny_llama(0), tiny_llama(1)
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        run_trainer(policy, [TrustRegionCallback(ref, alpha=0.6, tau=2)], tmp_path / "elsewhere",
                    resume=str(straight_dir / f"checkpoint-{SAVE_EVERY}"))


# ---------------------------------------------------------------- trust region, LoRA adapter

def adapter_tensors(model, adapter: str) -> dict:
    """The adapter's parameters keyed by name with the adapter component removed."""
    return {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters()
            if f".{adapter}." in n}


def test_lora_reference_adapter_follows_the_schedule_and_resumes_exactly(tmp_path):
    policy = lora_llama(0)
    policy_adapter = adapter_tensors(policy, "default")
    ref0 = params64(policy_adapter)              # the reference adapter starts as a copy
    policy_seen = Recorder(policy_adapter)
    callback = TrustRegionCallback(alpha=0.5, tau=2)
    run_trainer(policy, [policy_seen, callback], tmp_path / "straight")
    ref_adapter = adapter_tensors(policy, "ref")
    assert ref_adapter.keys() == policy_adapter.keys()
    assert not any(p.requires_grad for p in ref_adapter.values())
    assert all(p.requires_grad for p in policy_adapter.values())
    oracle = lerp_oracle(ref0, policy_seen.steps, alpha=0.5, tau=2)
    assert_close64(ref_adapter, oracle[STEPS])
    want_all = exact(policy)

    resumed = lora_llama(0)                      # has no "ref" adapter: the checkpoint brings it
    shutil.copytree(tmp_path / "straight" / f"checkpoint-{SAVE_EVERY}",
                    tmp_path / "resumed" / f"checkpoint-{SAVE_EVERY}")
    resumed_cb = TrustRegionCallback(alpha=0.5, tau=2)
    run_trainer(resumed, [resumed_cb], tmp_path / "resumed", resume=True)
    assert_bits_equal(exact(resumed), want_all)
    assert (resumed_cb.strategy.num_updates, resumed_cb.strategy.last_update_step) == (3, STEPS)

    # the reference log-probs: the model with the reference adapter active, no graph
    tokens = TokenDataset(rows=2)[0]["input_ids"][None]
    with use_reference_adapter(policy) as model:
        ref_logits = model(input_ids=tokens).logits
    assert not ref_logits.requires_grad
    assert all(p.requires_grad for p in policy_adapter.values())
    assert not any(p.requires_grad for p in ref_adapter.values())
    as_policy = copy.deepcopy(policy)            # independent: the ref weights in the policy slot
    with torch.no_grad():
        for name, param in adapter_tensors(as_policy, "default").items():
            param.copy_(ref_adapter[name])
    torch.testing.assert_close(ref_logits, as_policy(input_ids=tokens).logits, rtol=0, atol=0)
    assert not torch.equal(ref_logits, policy(input_ids=tokens).logits)


# ---------------------------------------------------------------- elastic reset

def test_elastic_reset_resets_on_schedule(tmp_path):
    policy = tiny_llama(0)
    init = params64(dict(policy.named_parameters()))
    before = Recorder(dict(policy.named_parameters()))
    after = Recorder(dict(policy.named_parameters()))
    callback = ElasticResetCallback(ema_decay=0.5, reset_every=2, ema_every=1)
    run_trainer(policy, [before, callback, after], tmp_path)
    ema = dict(init)
    for step in range(1, STEPS + 1):
        ema = {n: 0.5 * ema[n] + 0.5 * before.steps[step][n] for n in ema}
        if step % 2 == 0:                        # policy <- ema, then ema <- init
            assert_close64(after.steps[step], ema)
            ema = dict(init)
        else:
            assert_bits_equal(after.steps[step], before.steps[step])
    assert callback.strategy.num_resets == 3
    assert_close64(dict(zip(callback.strategy.names, callback.strategy.ema_tensors)), ema)


def elastic_callback():
    return ElasticResetCallback(ema_decay=0.8, reset_every=4, ema_every=2, reset_optimizer=True)


def test_elastic_reset_on_a_lora_policy_tracks_the_adapter_only():
    from transformers import TrainerControl, TrainerState
    policy = lora_llama(0)
    callback = ElasticResetCallback(ema_decay=0.9, reset_every=4)
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert callback.strategy.names == trainable
    assert trainable and all(".default." in n for n in trainable)


@pytest.fixture(scope="module")
def straight_elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("er_straight")
    policy, callback = tiny_llama(0), elastic_callback()
    trainer = run_trainer(policy, [callback], out)
    return out, policy, callback, trainer


def test_elastic_reset_drops_the_optimizer_state_at_a_reset(straight_elastic):
    trainer = straight_elastic[3]
    # the reset at step 4 dropped the AdamW state: steps 5 and 6 started it afresh
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {STEPS - 4}


@pytest.mark.parametrize("resume", ["last", "path"])
def test_elastic_reset_resume_is_bit_identical(straight_elastic, tmp_path, resume):
    straight_dir, straight, straight_cb, _ = straight_elastic
    checkpoint = straight_dir / f"checkpoint-{SAVE_EVERY}"
    run_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, run_dir / checkpoint.name)
    resumed, resumed_cb = tiny_llama(5), elastic_callback()   # other weights: the init must come back
    run_trainer(resumed, [resumed_cb], run_dir,
                resume=True if resume == "last" else str(run_dir / checkpoint.name))
    assert_bits_equal(exact(resumed), exact(straight))
    got, want = resumed_cb.strategy.state_dict(), straight_cb.strategy.state_dict()
    assert_bits_equal(got["ema"], want["ema"])
    assert_bits_equal(got["init"], want["init"])
    assert (resumed_cb.strategy.num_resets, resumed_cb.strategy.num_ema_updates) == (1, 3)


# ---------------------------------------------------------------- TRL

@pytest.fixture(scope="module")
def tokenizer():
    from hf_models import train_tokenizer
    return train_tokenizer(vocab_size=300)


def dpo_parts(tokenizer):
    Dataset = pytest.importorskip("datasets", reason="datasets is not installed ([test] extra)").Dataset

    from hf_models import build_tiny_model
    policy = build_tiny_model("llama", tokenizer, seed=0, hidden=16, layers=1).train()
    ref = build_tiny_model("llama", tokenizer, seed=1, hidden=16, layers=1)
    data = Dataset.from_dict({"prompt": ["the cat sat", "a dog ran", "it was big", "one two"],
                              "chosen": [" on the mat", " under a log", " and red", " three"],
                              "rejected": [" sad tree", " the moon", " no yes", " blue sun"]})
    return tokenizer, policy, ref, data


def dpo_config(output_dir, **overrides):
    from trl import DPOConfig
    settings = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2,
                    learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1000,
                    disable_tqdm=True, use_cpu=True, max_length=24, beta=0.1)
    settings.update(overrides)
    return DPOConfig(**settings)


def test_trl_dpo_trainer_with_trust_region_callback(tmp_path, tokenizer):
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer",
                                     reason="trl or datasets is not installed ([test] extra)").DPOTrainer
    from trl.trainer.callbacks import SyncRefModelCallback
    tokenizer, policy, ref, data = dpo_parts(tokenizer)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=dpo_config(tmp_path),
                         train_dataset=data, processing_class=tokenizer)
    assert not any(isinstance(c, SyncRefModelCallback) for c in trainer.callback_handler.callbacks)
    ref0 = params64(dict(trainer.ref_model.named_parameters()))
    policy_seen = Recorder(dict(policy.named_parameters()))
    trainer.add_callback(policy_seen)
    trainer.add_callback(TrustRegionCallback(trainer.ref_model, alpha=0.5, tau=1))
    trainer.train()
    oracle = lerp_oracle(ref0, policy_seen.steps, alpha=0.5, tau=1)
    assert sorted(policy_seen.steps) == [1, 2, 3]
    assert_close64(dict(trainer.ref_model.named_parameters()), oracle[3])

    # TRL's own sync_ref_model on as well would update the reference twice: refused
    _, policy, ref, _ = dpo_parts(tokenizer)
    both = DPOTrainer(model=policy, ref_model=ref, args=dpo_config(tmp_path, sync_ref_model=True),
                      train_dataset=data, processing_class=tokenizer,
                      callbacks=[TrustRegionCallback(ref, alpha=0.5, tau=1)])
    with pytest.raises(ValueError, match="sync_ref_model=False"):
        both.train()


def test_trl_dpo_peft_reference_is_the_lerped_adapter(tmp_path, tokenizer):
    """DPOTrainer given a peft_config computes the reference log-probs with the adapter named
    "ref" when the model has one: the callback adds it and moves it."""
    from peft import LoraConfig
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer",
                                     reason="trl or datasets is not installed ([test] extra)").DPOTrainer
    tokenizer, policy, _, data = dpo_parts(tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM", init_lora_weights="gaussian")
    trainer = DPOTrainer(model=policy, args=dpo_config(tmp_path), train_dataset=data,
                         processing_class=tokenizer, peft_config=lora)
    model = trainer.model
    assert trainer.ref_model is None and "ref" not in model.peft_config
    policy_adapter = adapter_tensors(model, "default")
    ref0 = params64(policy_adapter)
    policy_seen = Recorder(policy_adapter)
    trainer.add_callback(policy_seen)
    trainer.add_callback(TrustRegionCallback(alpha=0.5, tau=2))
    trainer.train()
    oracle = lerp_oracle(ref0, policy_seen.steps, alpha=0.5, tau=2)
    ref_adapter = adapter_tensors(model, "ref")
    assert_close64(ref_adapter, oracle[3])

    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    with torch.no_grad():        # TRL reads the adapter: moving it moves the reference log-probs
        for name, param in ref_adapter.items():
            param.copy_(policy_adapter[name])
    moved_chosen, _ = trainer.compute_ref_log_probs(model, batch)
    assert not torch.equal(moved_chosen, ref_chosen)
    assert torch.isfinite(ref_chosen).all() and torch.isfinite(ref_rejected).all()


# ---------------------------------------------------------------- bad arguments

def test_bad_arguments_raise_clear_errors(tmp_path):
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            TrustRegionCallback(alpha=alpha)
    for tau in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tau"):
            TrustRegionCallback(tau=tau)
    with pytest.raises(TypeError, match="ref_model"):
        TrustRegionCallback("model")
    with pytest.raises(ValueError, match="adapter_name"):
        TrustRegionCallback(adapter_name="")
    with pytest.raises(ValueError, match="backend"):
        TrustRegionCallback(backend="fast")
    for decay in (1.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="ema_decay"):
            ElasticResetCallback(ema_decay=decay, reset_every=4)
    with pytest.raises(ValueError, match="reset_every"):
        ElasticResetCallback(ema_decay=0.9, reset_every=0)
    with pytest.raises(ValueError, match="ema_every"):
        ElasticResetCallback(ema_decay=0.9, reset_every=4, ema_every=2.0)
    with pytest.raises(TypeError, match="ema_dtype"):
        ElasticResetCallback(ema_decay=0.9, reset_every=4, ema_dtype=torch.int32)
    with pytest.raises(TypeError, match="init"):
        ElasticResetCallback(ema_decay=0.9, reset_every=4, init=[1.0])
    # no reference model and a policy that is not a peft model
    with pytest.raises(ValueError, match="pass ref_model="):
        run_trainer(tiny_llama(0), [TrustRegionCallback(tau=2)], tmp_path, max_steps=1)
    with pytest.raises(TypeError, match="PeftModel"):
        with use_reference_adapter(tiny_llama(0)):
            pass
    with pytest.raises(ValueError, match="no adapter 'reference'"):
        with use_reference_adapter(lora_llama(0), "reference"):
            pass


# ---------------------------------------------------------------- BEMA

SCHEDULES = {
    "trl-defaults-every-2": dict(update_freq=2, update_after=2),
    "ema-floor-and-multiplier": dict(update_freq=3, update_after=1, ema_power=0.8, bias_power=0.5,
                                     lag=3, multiplier=2.0, min_ema_multiplier=0.4),
}


def drive(callbacks, model, args, steps, **handed):
    """on_train_begin, then per step: a fake optimizer step of the trainable parameters (the same
    draws for every model driven this way) and on_step_end of each callback in order, as the
    Trainer calls them."""
    state, control = TrainerState(), TrainerControl()
    for callback in callbacks:
        callback.on_train_begin(args, state, control, model=model, **handed)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        state.global_step = step
        for callback in callbacks:
            callback.on_step_end(args, state, control, model=model, **handed)


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_weights_equal_trls_own_bema_callback(tmp_path, schedule):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trl_policy = tiny_llama(0)
    ours_policy, ref_policy = copy.deepcopy(trl_policy), copy.deepcopy(trl_policy)
    TRLBEMACallback = pytest.importorskip(
        "trl.trainer.callbacks", reason="trl is not installed ([test] extra)").BEMACallback
    trl = TRLBEMACallback(**schedule)
    drive([trl], trl_policy, args, 10)
    running = BEMACallback(**schedule)
    drive([running], ours_policy, args, 10)
    ref_model = tiny_llama(1)
    into_ref = BEMACallback(**schedule, ref_model=ref_model)
    drive([into_ref], ref_policy, args, 10)

    assert torch.equal(next(trl_policy.parameters()), next(ours_policy.parameters()))  # same updates
    want = dict(trl.running_model.named_parameters())
    for got in (dict(running.running_model.named_parameters()), dict(ref_model.named_parameters())):
        assert got.keys() == want.keys()
        for name in want:  # TRL's (1 - b) e + b p vs our e + b (p - e): a few fp32 ulps apart
            torch.testing.assert_close(got[name], want[name], rtol=2e-6, atol=2e-7, msg=name)
    assert not torch.equal(want["lm_head.weight"], trl_policy.lm_head.weight)  # BEMA moved it


@pytest.fixture(scope="module")
def straight_bema(tmp_path_factory):
    """Six Trainer steps straight (checkpoints at 3 and 6), BEMA into its running model."""
    out = tmp_path_factory.mktemp("bema_straight")
    policy = tiny_llama(0)
    initial = params64(dict(policy.named_parameters()))
    policy_seen = Recorder(dict(policy.named_parameters()))
    callback = BEMACallback(update_freq=2, update_after=1, lag=2)
    run_trainer(policy, [policy_seen, callback], out)
    return dict(dir=out, callback=callback, initial=initial, policy_seen=policy_seen.steps,
                running=exact(callback.running_model))


def test_trainer_run_follows_the_schedule_and_saves_the_bema_model(straight_bema):
    schedule = dict(update_freq=2, update_after=1, lag=2, multiplier=1.0, ema_power=0.5,
                    bias_power=0.2, min_ema_multiplier=0.0)
    oracle = bema_trajectory64(straight_bema["policy_seen"], straight_bema["initial"], schedule)
    for name, tensor in straight_bema["running"].items():
        torch.testing.assert_close(tensor.double(), oracle[6][name], rtol=1e-6, atol=1e-7, msg=name)
    saved = AutoModelForCausalLM.from_pretrained(str(straight_bema["dir"] / "bema"))
    for name, param in saved.named_parameters():  # TRL's place for it: output_dir/bema
        assert torch.equal(param, straight_bema["running"][name]), name
    assert (straight_bema["dir"] / "checkpoint-3" / f"{STATE_FILES['BEMA']}.pt").is_file()


def test_trainer_resume_is_bit_identical(straight_bema, tmp_path):
    shutil.copytree(straight_bema["dir"] / "checkpoint-3", tmp_path / "checkpoint-3")
    callback = BEMACallback(update_freq=2, update_after=1, lag=2)
    run_trainer(tiny_llama(0), [callback], tmp_path, resume=True)
    got = exact(callback.running_model)
    for name, tensor in straight_bema["running"].items():
        assert torch.equal(got[name], tensor), name
    # updates at steps 3 and 5
    assert callback.strategy.num_updates == straight_bema["callback"].strategy.num_updates == 2


def test_peft_policy_moves_its_reference_adapter(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    model = lora_llama(0)
    policy_adapter = adapter_tensors(model, "default")
    initial = params64(policy_adapter)
    seen = Recorder(policy_adapter)  # before the callback: the policy each update reads
    callback = BEMACallback(update_freq=2, update_after=1, lag=2)
    drive([seen, callback], model, args, 5)
    assert callback.running_model is None
    oracle = bema_trajectory64(seen.steps, initial, dict(update_freq=2, update_after=1, lag=2,
                                                     multiplier=1.0, ema_power=0.5, bias_power=0.2,
                                                     min_ema_multiplier=0.0))
    ref_adapter = adapter_tensors(model, "ref")
    for name, tensor in ref_adapter.items():
        policy_name = name.replace(".ref.", ".default.")
        torch.testing.assert_close(tensor.double(), oracle[5][policy_name], rtol=1e-6, atol=1e-7)


def test_bema_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="update_freq must be an int >= 1"):
        BEMACallback(update_freq=0)
    with pytest.raises(ValueError, match=r"min_ema_multiplier must be in \[0, 1\]"):
        BEMACallback(min_ema_multiplier=2.0)
    with pytest.raises(TypeError, match="ref_model must be an nn.Module"):
        BEMACallback(ref_model="ref")
    with pytest.raises(ValueError, match="adapter_name"):
        BEMACallback(adapter_name="")
    with pytest.raises(TypeError, match="ema_dtype"):
        BEMACallback(ema_dtype=torch.int64)
    with pytest.raises(ValueError, match="backend"):
        BEMACallback(backend="fast")
    args = type("Args", (), dict(output_dir=str(tmp_path), world_size=1, sync_ref_model=True))()
    with pytest.raises(ValueError, match="sync_ref_model=False"):
        BEMACallback(ref_model=tiny_llama(1)).on_train_begin(args, TrainerState(), TrainerControl(),
                                                            model=tiny_llama(0))


# ---------------------------------------------------------------- FSDP2-style shards

def test_state_is_saved_and_restored_per_rank_shard_local(tmp_path):
    """DTensor parameters (what FSDP2 trains): the callback saves and restores each rank's local
    shards, in a per-rank file when the run has several processes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    from transformers import TrainerControl, TrainerState
    created = not dist.is_initialized()
    if created:                 # a one-rank gloo group: enough to build DTensor parameters
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])

        def sharded(seed):
            torch.manual_seed(seed)
            layer = torch.nn.Linear(6, 5)
            for name, param in list(layer.named_parameters()):
                setattr(layer, name, torch.nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))
            return layer

        # what TrainingArguments says on rank 1 of 2
        args = type("Args", (), dict(output_dir=str(tmp_path), world_size=2, process_index=1,
                                     resume_from_checkpoint=None))()
        policy, ref = sharded(1), sharded(2)
        want = {n: 0.25 * policy.get_parameter(n).to_local().double()
                + 0.75 * p.to_local().double() for n, p in ref.named_parameters()}
        callback, state = TrustRegionCallback(ref, alpha=0.25, tau=1), TrainerState()
        callback.on_train_begin(args, state, TrainerControl(), model=policy)
        state.global_step = 1
        callback.on_step_end(args, state, TrainerControl())
        callback.on_save(args, state, TrainerControl())
        saved = torch.load(tmp_path / "checkpoint-1" / "pyalign_trust_region_rank1.pt",
                           weights_only=True)
        assert_close64(saved["ref"], want)

        fresh_ref = sharded(3)
        resumed = TrustRegionCallback(fresh_ref, alpha=0.25, tau=1)
        resumed.on_train_begin(args, state, TrainerControl(), model=policy)
        for name, param in fresh_ref.named_parameters():
            assert type(param.data).__name__ == "DTensor"
            assert torch.equal(param.to_local(), ref.get_parameter(name).to_local())
        assert resumed.strategy.last_update_step == 1
    finally:
        if created:
            dist.destroy_process_group()
