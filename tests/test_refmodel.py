"""pyalign.refmodel on a real (tiny) LlamaForCausalLM: every update checked against an
independent float64 computation (docs/algorithms.md), resets checked bit for bit; BEMA's reference
follows the float64 schedule (tests/support.py) in fp32 and for a bf16 policy with an fp32 state,
and a BEMA run stopped and resumed from its state_dict is bit-identical to a straight one (TRL's
own BEMACallback is run against ours in tests/integrations/test_callbacks.py)."""
import copy
import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyalign.refmodel import BEMA, ElasticReset, Frozen, TrustRegion
from support import DEVICE, bema_trajectory64


def tiny_llama(seed, dtype=torch.float32):
    """A 2-layer Llama whose every weight (norms included) differs from another seed's."""
    config = LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    perturb_(model, torch.Generator().manual_seed(1000 + seed))
    return model.to(dtype)


def perturb_(model, generator, scale=0.05):
    """A fake optimizer step: fresh random changes to every parameter (never zeros)."""
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((scale * noise).to(param.dtype))


def params64(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def params_exact(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_bits(model_or_dict, expected):
    got = dict(model_or_dict.named_parameters()) if hasattr(model_or_dict, "named_parameters") \
        else model_or_dict
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name].detach(), tensor), name


def assert_close64(model, expected64, operands64, dtype):
    """fp32 math, one rounding into the target's dtype: the error is a few fp32 ulps of the
    operands' magnitude (cancellation) plus half an ulp of the target dtype at the result."""
    for name, param in model.named_parameters():
        want = expected64[name]
        scale = torch.stack([op[name].abs() for op in operands64]).amax(0)
        tol = 4 * torch.finfo(torch.float32).eps * scale
        if dtype != torch.float32:
            tol = tol + torch.finfo(dtype).eps * want.abs()
        err = (param.detach().double() - want).abs()
        assert bool((err <= tol).all()), f"{name}: max err {err.max():.3g}"


@pytest.fixture
def policy_and_ref():
    ref = tiny_llama(0)
    policy = copy.deepcopy(ref)
    perturb_(policy, torch.Generator().manual_seed(1))
    return policy, ref


# ---------------------------------------------------------------- TrustRegion

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.6, 0.13])
def test_trust_region_soft_update_matches_float64(alpha, dtype):
    ref = tiny_llama(0, dtype)
    policy = tiny_llama(1, dtype)
    strategy = TrustRegion(policy, ref, alpha=alpha, tau=3)
    ref_before = params_exact(ref)
    assert strategy.step(1) is False and strategy.step(2) is False
    assert_same_bits(ref, ref_before)
    ref64, policy64 = params64(ref), params64(policy)
    assert strategy.step(3) is True
    expected = {n: alpha * policy64[n] + (1 - alpha) * ref64[n] for n in ref64}
    assert_close64(ref, expected, (ref64, policy64), dtype)
    assert_same_bits(policy, {n: t.to(dtype) for n, t in params_exact(policy).items()})
    # The update actually moved every tensor (it is not a no-op that the tolerance hides).
    for name, param in ref.named_parameters():
        assert not torch.equal(param.detach(), ref_before[name]), name


def test_trust_region_hard_update_copies_policy(policy_and_ref):
    policy, ref = policy_and_ref
    strategy = TrustRegion(policy, ref, alpha=1.0, tau=2)
    assert strategy.step(2) is True
    assert_same_bits(ref, params_exact(policy))


def test_trust_region_mixed_dtypes_fp32_ref_of_bf16_policy():
    ref = tiny_llama(0, torch.float32)
    policy = tiny_llama(1, torch.bfloat16)
    ref64, policy64 = params64(ref), params64(policy)
    TrustRegion(policy, ref, alpha=0.5, tau=1).step(1)
    assert_close64(ref, {n: 0.5 * policy64[n] + 0.5 * ref64[n] for n in ref64}, (ref64, policy64),
                   torch.float32)


def test_trust_region_nothing_happens_off_schedule(policy_and_ref):
    policy, ref = policy_and_ref
    strategy = TrustRegion(policy, ref, alpha=0.6, tau=4)
    ref_before = params_exact(ref)
    for global_step in (0, 1, 2, 3, 5, 6, 7, 9):
        assert strategy.step(global_step) is False
    assert_same_bits(ref, ref_before)
    assert strategy.num_updates == 0
    assert strategy.step(8) is True
    after_first = params_exact(ref)
    assert strategy.step(8) is False          # the same step reported twice: no second update
    assert_same_bits(ref, after_first)
    assert strategy.num_updates == 1 and strategy.last_update_step == 8


def test_trust_region_trainable_only_leaves_frozen_reference_params(policy_and_ref):
    policy, ref = policy_and_ref
    for name, param in policy.named_parameters():
        param.requires_grad_("q_proj" in name)
    ref_before = params_exact(ref)
    strategy = TrustRegion(policy, ref, alpha=1.0, tau=1, trainable_only=True)
    assert strategy.names and all("q_proj" in n for n in strategy.names)
    strategy.step(1)
    for name, param in ref.named_parameters():
        want = policy.get_parameter(name) if "q_proj" in name else ref_before[name]
        assert torch.equal(param.detach(), want.detach()), name


def test_trust_region_state_dict_round_trip(policy_and_ref):
    policy, ref = policy_and_ref
    gen = torch.Generator().manual_seed(7)
    strategy = TrustRegion(policy, ref, alpha=0.6, tau=2)
    for global_step in range(1, 4):
        perturb_(policy, gen)
        strategy.step(global_step)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    # Resume into fresh copies: the reference weights come from the state, not the models.
    resumed_policy = copy.deepcopy(policy)
    resumed_ref = tiny_llama(0)
    resumed = TrustRegion(resumed_policy, resumed_ref, alpha=0.6, tau=2)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_bits(resumed_ref, params_exact(ref))
    assert resumed.step(3) is False           # step 3 was done before the checkpoint
    for global_step in range(4, 7):
        perturb_(policy, torch.Generator().manual_seed(global_step))
        perturb_(resumed_policy, torch.Generator().manual_seed(global_step))
        assert strategy.step(global_step) == resumed.step(global_step)
    assert_same_bits(resumed_ref, params_exact(ref))


def test_trust_region_bad_arguments(policy_and_ref):
    policy, ref = policy_and_ref
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            TrustRegion(policy, ref, alpha=alpha, tau=4)
    for tau in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="tau"):
            TrustRegion(policy, ref, alpha=0.5, tau=tau)
    with pytest.raises(ValueError, match="same module"):
        TrustRegion(policy, policy)
    with pytest.raises(ValueError, match="shape|lacks"):
        TrustRegion(policy, LlamaForCausalLM(LlamaConfig(
            vocab_size=37, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2)))
    with pytest.raises(ValueError, match="global_step"):
        TrustRegion(policy, ref).step(-1)
    with pytest.raises(ValueError, match="TrustRegion"):
        TrustRegion(policy, ref).load_state_dict({"kind": "ElasticReset"})


def test_frozen_never_changes_anything(policy_and_ref):
    policy, ref = policy_and_ref
    before = params_exact(ref)
    strategy = Frozen(ref)
    assert not any(strategy.step(s) for s in range(0, 20))
    assert strategy.ref is ref
    strategy.load_state_dict(strategy.state_dict())
    assert_same_bits(ref, before)


# ---------------------------------------------------------------- ElasticReset

def test_elastic_reset_ema_matches_float64_recurrence(policy_and_ref):
    policy, ref = policy_and_ref
    decay = 0.9
    gen = torch.Generator().manual_seed(3)
    strategy = ElasticReset(policy, ema_decay=decay, reset_every=100, init=ref)
    ema64 = params64(ref)                         # the EMA starts at the initial weights
    scale = {n: t.abs() for n, t in ema64.items()}
    for global_step in range(1, 6):
        perturb_(policy, gen)
        policy64 = params64(policy)
        assert strategy.step(global_step) is True
        ema64 = {n: decay * ema64[n] + (1 - decay) * policy64[n] for n in ema64}
        scale = {n: torch.maximum(scale[n], policy64[n].abs()) for n in scale}
    got = dict(zip(strategy.names, strategy.ema_tensors))
    for name, want in ema64.items():
        # five steps of fp32 rounding, each a few ulps of the operands' size
        tol = 20 * torch.finfo(torch.float32).eps * scale[name]
        assert bool(((got[name].double() - want).abs() <= tol).all()), name
    assert strategy.num_ema_updates == 5 and strategy.num_resets == 0


def test_elastic_reset_resets_bit_for_bit(policy_and_ref):
    policy, ref = policy_and_ref
    init_before = params_exact(ref)
    gen = torch.Generator().manual_seed(4)
    # EMA on even steps, reset on step 3: the reset step has no EMA update of its own, so the
    # EMA just before the reset is observable and the policy must equal it exactly.
    strategy = ElasticReset(policy, ema_decay=0.8, reset_every=3, ema_every=2, init=ref)
    perturb_(policy, gen)
    assert strategy.step(1) is False
    perturb_(policy, gen)
    assert strategy.step(2) is True
    ema_before = {n: t.clone() for n, t in zip(strategy.names, strategy.ema_tensors)}
    perturb_(policy, gen)
    assert strategy.step(3) is True
    assert_same_bits(policy, ema_before)
    assert_same_bits(dict(zip(strategy.names, strategy.ema_tensors)), init_before)
    assert_same_bits(ref, init_before)            # the init (= KL reference) is never written
    assert strategy.num_resets == 1


def test_elastic_reset_updates_ema_then_resets_on_the_same_step(policy_and_ref):
    policy, ref = policy_and_ref
    decay = 0.7
    gen = torch.Generator().manual_seed(5)
    strategy = ElasticReset(policy, ema_decay=decay, reset_every=2, init=ref)
    perturb_(policy, gen)
    strategy.step(1)
    ema64 = {n: t.double().clone() for n, t in zip(strategy.names, strategy.ema_tensors)}
    perturb_(policy, gen)
    policy64 = params64(policy)
    assert strategy.step(2) is True
    expected = {n: decay * ema64[n] + (1 - decay) * policy64[n] for n in ema64}
    assert_close64(policy, expected, (ema64, policy64), torch.float32)
    assert_same_bits(dict(zip(strategy.names, strategy.ema_tensors)), params_exact(ref))


def test_elastic_reset_default_init_snapshots_the_policy(policy_and_ref):
    policy, _ = policy_and_ref
    initial = params_exact(policy)
    gen = torch.Generator().manual_seed(6)
    strategy = ElasticReset(policy, ema_decay=0.5, reset_every=2)
    assert strategy.owns_init and strategy.ref is None
    for global_step in (1, 2):
        perturb_(policy, gen)
        strategy.step(global_step)
    assert_same_bits(dict(zip(strategy.names, strategy.ema_tensors)), initial)
    assert not torch.equal(policy.model.embed_tokens.weight, initial["model.embed_tokens.weight"])


def test_elastic_reset_shares_the_reference_weights_as_init(policy_and_ref):
    policy, ref = policy_and_ref
    strategy = ElasticReset(policy, ema_decay=0.9, reset_every=5, init=ref)
    ref_storages = {p.data_ptr() for p in ref.parameters()}
    assert not strategy.owns_init and strategy.ref is ref
    assert all(t.data_ptr() in ref_storages for t in strategy._init_tensors)
    assert not any(t.data_ptr() in ref_storages for t in strategy.ema_tensors)
    assert "init" not in strategy.state_dict()


def test_elastic_reset_trainable_only(policy_and_ref):
    policy, ref = policy_and_ref
    for name, param in policy.named_parameters():
        param.requires_grad_("mlp" in name)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    before = params_exact(policy)
    policy64, ref64 = params64(policy), params64(ref)
    strategy = ElasticReset(policy, ema_decay=0.25, reset_every=1, init=ref)
    assert strategy.names == trainable and len(strategy.ema_tensors) == len(trainable)
    strategy.step(1)   # ema = 0.25*ref + 0.75*policy, then policy <- ema, on the mlp only
    for name, param in policy.named_parameters():
        if name in trainable:
            want = 0.25 * ref64[name] + 0.75 * policy64[name]
            err = (param.detach().double() - want).abs()
            scale = torch.maximum(ref64[name].abs(), policy64[name].abs())
            assert bool((err <= 4 * torch.finfo(torch.float32).eps * scale).all()), name
        else:
            assert torch.equal(param.detach(), before[name]), name
    everything = ElasticReset(policy, ema_decay=0.5, reset_every=1, init=ref, trainable_only=False)
    assert len(everything.names) == len(list(policy.parameters()))


def _train_step(model, optimizer, generator):
    tokens = torch.randint(0, 37, (2, 6), generator=generator)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_elastic_reset_optimizer_state(policy_and_ref, reset_optimizer):
    policy, ref = policy_and_ref
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(8)
    strategy = ElasticReset(policy, ema_decay=0.9, reset_every=2, init=ref,
                            reset_optimizer=reset_optimizer)
    for global_step in (1, 2):
        _train_step(policy, optimizer, gen)
        strategy.step(global_step, optimizer=optimizer)
        if global_step == 1:
            assert len(optimizer.state) == len(list(policy.parameters()))
    assert len(optimizer.state) == (0 if reset_optimizer else len(list(policy.parameters())))
    _train_step(policy, optimizer, gen)          # the optimizer still works after the reset
    assert all(int(s["step"]) == (1 if reset_optimizer else 3) for s in optimizer.state.values())


def test_elastic_reset_optimizer_needed_when_asked(policy_and_ref):
    policy, ref = policy_and_ref
    strategy = ElasticReset(policy, reset_every=2, init=ref, reset_optimizer=True)
    with pytest.raises(ValueError, match="optimizer"):
        strategy.step(1)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    attached = ElasticReset(policy, reset_every=1, init=ref, reset_optimizer=True,
                            optimizer=optimizer)
    assert attached.step(1) is True


def test_elastic_reset_state_dict_round_trip(policy_and_ref):
    policy, _ = policy_and_ref
    gen = torch.Generator().manual_seed(9)
    strategy = ElasticReset(policy, ema_decay=0.8, reset_every=3)    # owns its init copy
    for global_step in range(1, 5):
        perturb_(policy, gen)
        strategy.step(global_step)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    resumed_policy = copy.deepcopy(policy)
    resumed = ElasticReset(resumed_policy, ema_decay=0.8, reset_every=3)   # wrong init snapshot
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.last_step == 4 and resumed.num_resets == 1
    for global_step in range(5, 10):     # crosses two resets: the restored init is used
        perturb_(policy, torch.Generator().manual_seed(global_step))
        perturb_(resumed_policy, torch.Generator().manual_seed(global_step))
        assert strategy.step(global_step) == resumed.step(global_step)
    assert_same_bits(resumed_policy, params_exact(policy))
    for mine, theirs in zip(strategy.ema_tensors, resumed.ema_tensors):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="ema"):
        resumed.load_state_dict({**strategy.state_dict(), "ema": {}})


def test_elastic_reset_bad_arguments(policy_and_ref):
    policy, ref = policy_and_ref
    for decay in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ema_decay"):
            ElasticReset(policy, ema_decay=decay, reset_every=5)
    for every in (0, -1, 1.5):
        with pytest.raises(ValueError, match="reset_every"):
            ElasticReset(policy, reset_every=every)
        with pytest.raises(ValueError, match="ema_every"):
            ElasticReset(policy, reset_every=5, ema_every=every)
    with pytest.raises(ValueError, match="policy itself"):
        ElasticReset(policy, reset_every=5, init=policy)
    with pytest.raises(TypeError, match="init"):
        ElasticReset(policy, reset_every=5, init=[1, 2])
    with pytest.raises(ValueError, match="global_step"):
        ElasticReset(policy, reset_every=5).step(-2)


def test_wrapper_prefixes_pair_by_name(policy_and_ref):
    policy, ref = policy_and_ref

    class Wrapped(torch.nn.Module):          # what DDP does to parameter names
        def __init__(self, module):
            super().__init__()
            self.module = module

    strategy = TrustRegion(Wrapped(policy), ref, alpha=1.0, tau=1)
    strategy.step(1)
    assert_same_bits(ref, params_exact(policy))


def test_dtensor_parameters_update_shard_local(tmp_path):
    """TrustRegion and BEMA on DTensor (FSDP2) parameters update each rank's local shards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built into this torch")
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    created = False
    if not dist.is_initialized():   # a one-rank gloo group: enough to build DTensor parameters
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        created = True
    try:
        mesh = DeviceMesh("cpu", [0])

        def sharded_linear(seed):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                layer = torch.nn.Linear(6, 5)
            for name, param in list(layer.named_parameters()):
                setattr(layer, name, torch.nn.Parameter(distribute_tensor(param.data, mesh,
                                                                          [Shard(0)])))
            return layer

        policy, ref = sharded_linear(1), sharded_linear(2)
        policy64 = {n: p.to_local().double() for n, p in policy.named_parameters()}
        ref64 = {n: p.to_local().double() for n, p in ref.named_parameters()}
        TrustRegion(policy, ref, alpha=0.25, tau=1).step(1)
        for name, param in ref.named_parameters():
            want = 0.25 * policy64[name] + 0.75 * ref64[name]
            assert type(param.data).__name__ == "DTensor"
            torch.testing.assert_close(param.to_local().double(), want, rtol=1e-6, atol=1e-7)

        # BEMA: its EMA and snapshot are plain local shards, its update writes ref's shards
        bema = BEMA(policy, ref, update_freq=1, lag=3)
        assert not any(type(t).__name__ == "DTensor" for t in bema.ema_tensors + bema.init_tensors)
        with torch.no_grad():
            for param in policy.parameters():
                param.to_local().add_(torch.randn(param.to_local().shape))
        assert bema.step(1)
        alpha, beta = 4.0 ** -0.2, 4.0 ** -0.5
        for name, param in ref.named_parameters():
            theta = policy.get_parameter(name).to_local().double()
            want = (1 - beta) * policy64[name] + beta * theta + alpha * (theta - policy64[name])
            assert type(param.data).__name__ == "DTensor"
            torch.testing.assert_close(param.to_local().double(), want, rtol=1e-6, atol=1e-6)
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------- BEMA

# Small enough that 9 steps see the burn-in, the snapshot and four updates.
SCHEDULE = dict(update_freq=2, ema_power=0.5, bias_power=0.2, lag=4, update_after=3,
                multiplier=1.5, min_ema_multiplier=0.05)
STEPS = 9


def run_bema(policy, ref, steps, strategy=None, first=1, **options):
    """Fake optimizer steps first..steps, each followed by strategy.step; returns the strategy,
    the steps it reported an update at and the float64 policy at each step."""
    strategy = strategy or BEMA(policy, ref, **SCHEDULE, **options)
    generator = torch.Generator().manual_seed(77)
    for _ in range(1, first):  # the perturbations already applied before a resume
        perturb_(copy.deepcopy(policy), generator)
    updated, policy_at = [], {}
    for step in range(first, steps + 1):
        perturb_(policy, generator)
        policy_at[step] = params64(policy)
        if strategy.step(step):
            updated.append(step)
    return strategy, updated, policy_at


@pytest.mark.parametrize("dtype,ema_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-policy-fp32-state"])
def test_reference_follows_the_float64_schedule(dtype, ema_dtype):
    policy, ref = tiny_llama(0, dtype).to(DEVICE), tiny_llama(1, dtype).to(DEVICE)
    initial, ref_before = params64(policy), params64(ref)
    checked = []

    class Checking(BEMA):
        def step(self, global_step, optimizer=None):
            changed = super().step(global_step, optimizer)
            checked.append((global_step, params64(self.ref)))
            return changed

    strategy = Checking(policy, ref, **SCHEDULE, ema_dtype=ema_dtype)
    _, updated, policy_at = run_bema(policy, ref, STEPS, strategy=strategy)
    assert updated == [5, 7, 9] and strategy.num_updates == 3
    oracle = bema_trajectory64(policy_at, initial, SCHEDULE)
    # bf16 weights: half a bf16 ulp of rounding (2^-9) and the fp32 state's error; fp32 ones: a
    # few fp32 ulps per update
    rtol, atol = (2 ** -8, 1e-6) if dtype == torch.bfloat16 else (1e-6, 1e-7)
    for step, ref_now in checked:
        want = oracle[step] or ref_before  # untouched until the first update
        for name in want:
            torch.testing.assert_close(ref_now[name], want[name], rtol=rtol, atol=atol,
                                       msg=f"step {step} {name}")


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("stop", [4, 5], ids=["after-the-snapshot", "right-after-an-update"])
def test_stop_and_resume_is_bit_identical(stop):
    options = dict(ema_dtype=torch.float32)
    straight_policy, straight_ref = tiny_llama(0, torch.bfloat16), tiny_llama(1, torch.bfloat16)
    straight, _, _ = run_bema(straight_policy, straight_ref, STEPS, **options)

    policy, ref = tiny_llama(0, torch.bfloat16), tiny_llama(1, torch.bfloat16)
    first, _, _ = run_bema(policy, ref, stop, **options)
    saved, policy_saved = saved_and_loaded(first.state_dict()), saved_and_loaded(policy.state_dict())
    # a fresh process: new models (the reference from another seed), a new strategy, the state
    resumed_policy, resumed_ref = tiny_llama(5, torch.bfloat16), tiny_llama(6, torch.bfloat16)
    resumed_policy.load_state_dict(policy_saved)
    resumed = BEMA(resumed_policy, resumed_ref, **SCHEDULE, **options)
    resumed.load_state_dict(saved)
    run_bema(resumed_policy, resumed_ref, STEPS, strategy=resumed, first=stop + 1)

    for name, param in straight_ref.named_parameters():
        assert torch.equal(dict(resumed_ref.named_parameters())[name], param), name
    for key in ("ema", "init"):
        for name, tensor in straight.state_dict()[key].items():
            assert torch.equal(resumed.state_dict()[key][name], tensor), (key, name)
    assert (resumed.num_updates, resumed.last_update_step) == (straight.num_updates, 9)


def test_frozen_parameters_are_not_tracked():
    policy, ref = tiny_llama(0), tiny_llama(1)
    policy.model.embed_tokens.weight.requires_grad_(False)
    frozen_before = ref.model.embed_tokens.weight.detach().clone()
    strategy, updated, _ = run_bema(policy, ref, STEPS)
    assert updated and "model.embed_tokens.weight" not in strategy.state_dict()["ema"]
    assert torch.equal(ref.model.embed_tokens.weight, frozen_before)
    assert not torch.equal(ref.lm_head.weight, tiny_llama(1).lm_head.weight)


def test_state_on_the_cpu_equals_state_beside_the_weights():
    """device="cpu" (TRL's placement; on a GPU the policy is staged to the CPU at each update)
    gives the same reference as the state kept beside each parameter."""
    beside_policy, beside_ref = tiny_llama(0).to(DEVICE), tiny_llama(1).to(DEVICE)
    run_bema(beside_policy, beside_ref, STEPS)
    policy, ref = tiny_llama(0).to(DEVICE), tiny_llama(1).to(DEVICE)
    strategy, _, _ = run_bema(policy, ref, STEPS, device="cpu")
    assert all(t.device.type == "cpu" for t in strategy.ema_tensors)
    for name, param in beside_ref.named_parameters():
        assert torch.equal(dict(ref.named_parameters())[name].cpu(), param.cpu()), name


@pytest.mark.parametrize("setting,value,message", [
    ("update_freq", 0, "update_freq must be an int >= 1"),
    ("update_after", -1, "update_after must be an int >= 0"),
    ("update_freq", 2.0, "update_freq must be an int"),
    ("lag", -1.0, "lag must be a finite number >= 0"),
    ("ema_power", float("nan"), "ema_power must be a finite number"),
    ("min_ema_multiplier", 1.5, r"min_ema_multiplier must be in \[0, 1\]"),
    ("multiplier", 0.0, r"lag \+ multiplier \* \(update_after \+ update_freq\) = 0.0 < 1"),
])
def test_bad_settings_are_named(setting, value, message):
    schedule = {**SCHEDULE, setting: value}
    if setting == "multiplier":
        schedule["lag"] = 0
    with pytest.raises(ValueError, match=message):
        BEMA(tiny_llama(0), tiny_llama(1), **schedule)


def test_bad_models_and_states_are_named():
    policy, ref = tiny_llama(0), tiny_llama(1)
    with pytest.raises(ValueError, match="the same module"):
        BEMA(policy, policy)
    with pytest.raises(ValueError, match="ref lacks 1 parameter"):
        BEMA(policy, {n: p for n, p in ref.named_parameters() if n != "lm_head.weight"})
    strategy = BEMA(policy, ref)
    with pytest.raises(ValueError, match="not a BEMA state_dict"):
        strategy.load_state_dict({"kind": "TrustRegion"})
    state = strategy.state_dict()
    state["ema"] = {**state["ema"], "lm_head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"ema\['lm_head.weight'\]: shape \(3,\)"):
        strategy.load_state_dict(state)
    with pytest.raises(ValueError, match="global_step must be an int >= 0"):
        strategy.step(-1)
