"""pyalign.tasks: the embedded, download-free task (determinism, exact gold reward, proxy
reward quality and exploitability, SFT model quality, cache, sampling), its variable-length
variant (documents that end, the per-word gold reward, the labellers' length bias that the proxy
learns) and the model-size ladder."""
import math

import pytest
import torch

from pyalign.tasks import MODEL_SIZES, TaskConfig, gold_reward, language, lengthy, make_task
from pyalign.tasks.task import generate
from support import torch_threads

# A small config for the tests that build more than once (determinism): what is tested does not
# depend on the sizes.
SMALL = TaskConfig(sft_steps=12, rm_pairs=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices: a second intra-op thread buys nothing and stalls on a shared machine.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("task_cache")


@pytest.fixture(scope="module")
def task(cache_dir):
    built = make_task(0, cache_dir=cache_dir, progress=False)
    assert not built.from_cache
    return built


def ids(category):
    return language.category_token_ids()[category]


def spearman(a, b):
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


# ---------------------------------------------------------------- the gold reward, by hand

def test_gold_reward_on_hand_built_sequences():
    det, adj, pos, neg = ids("det")[0], ids("adj")[1], ids("pos")[2], ids("neg")[3]
    noun, verb, adv, stop = ids("noun")[4], ids("verb")[0], ids("adv")[1], ids("stop")[0]
    bos, eos = language.BOS_ID, language.EOS_ID
    cases = [
        # det | pos pos noun verb det neg: all grammatical, 2 positive, 1 negative -> (2-1)/6
        ([bos, det], [pos, pos, noun, verb, det, neg], (2 - 1) / 6),
        # noun | pos ...: noun->pos and stop->pos are ungrammatical (no credit, -1 each) -> -2/6
        ([bos, noun], [pos, noun, stop, pos, adj, noun], (0 - 0 - 2) / 6),
        # det | eos det neg noun verb adv: det->eos, eos->det ungrammatical; 1 negative -> -3/6
        ([bos, det], [eos, det, neg, noun, verb, adv], (0 - 1 - 2) / 6),
        # det | pos pos pos pos noun stop: the 3rd and 4th adjectives in a row are ungrammatical
        ([bos, det], [pos, pos, pos, pos, noun, stop], (2 - 0 - 2) / 6),
        # the run counts prompt adjectives: det adj | pos pos noun ... -> 2nd pos is the 3rd adj
        ([bos, det, adj], [pos, pos, noun, verb, adv, stop], (1 - 0 - 1) / 6),
        # the best well-formed run: det | pos pos noun stop det pos -> 3/6
        ([bos, det], [pos, pos, noun, stop, det, pos], 3 / 6),
        # a response right after bos must start with a determiner
        ([bos], [pos, noun, verb, det, noun, stop], (0 - 0 - 1) / 6),
    ]
    for prompt, response, expected in cases:
        got = gold_reward(torch.tensor([prompt]), torch.tensor([response]))
        assert got.dtype == torch.float32 and got.shape == (1,)
        assert math.isclose(float(got), expected, abs_tol=1e-7), (prompt, response, float(got))


def test_gold_reward_bounds_and_batching():
    det, pos, neg = ids("det")[0], ids("pos")[0], ids("neg")[0]
    noun = ids("noun")[0]
    prompts = torch.tensor([[language.BOS_ID, det]] * 3)
    responses = torch.tensor([[pos, pos, noun], [neg, neg, noun], [language.PAD_ID] * 3])
    got = gold_reward(prompts, responses)
    torch.testing.assert_close(got, torch.tensor([2 / 3, -2 / 3, -1.0]), rtol=0, atol=1e-7)


def test_gold_reward_rejects_bad_input():
    prompts = torch.tensor([[language.BOS_ID, ids("det")[0]]])
    with pytest.raises(ValueError, match="int64"):
        gold_reward(prompts.float(), prompts)
    with pytest.raises(ValueError, match="outside"):
        gold_reward(prompts, torch.tensor([[language.VOCAB_SIZE]]))
    with pytest.raises(ValueError, match="batch"):
        gold_reward(prompts.repeat(2, 1), prompts)
    with pytest.raises(ValueError, match="2-D"):
        gold_reward(prompts[0], prompts)


def test_language_without_noise_is_always_grammatical(monkeypatch):
    # The sampler (masked transition matrices) and the checker (grammar matrix + run length)
    # are separate code: with the noise off, every sampled position must pass the checker.
    monkeypatch.setattr(language, "NOISE_RATE", 0.0)
    text = language.Language(3).sample(400, 24, torch.Generator().manual_seed(0))
    assert bool((text[:, 0] == language.BOS_ID).all())
    assert bool(language.grammatical_positions(text[:, :1], text[:, 1:]).all())


def test_language_noise_makes_some_text_ungrammatical():
    text = language.Language(3).sample(400, 24, torch.Generator().manual_seed(0))
    bad = (~language.grammatical_positions(text[:, :1], text[:, 1:])).float().mean()
    assert 0.002 < float(bad) < 0.1


# ---------------------------------------------------------------- the built task

def test_task_api_shapes_and_types(task):
    gen = torch.Generator().manual_seed(1)
    assert task.vocab_size == language.VOCAB_SIZE == 64
    assert (task.bos_id, task.eos_id, task.pad_id) == (1, 2, 0)
    prompts = task.prompts(5, gen)
    assert prompts.shape == (5, task.prompt_len) and prompts.dtype == torch.long
    assert bool((prompts[:, 0] == task.bos_id).all())
    pairs = task.preference_pairs(6, gen)
    assert pairs["prompt"].shape == (6, task.prompt_len)
    assert pairs["chosen"].shape == pairs["rejected"].shape == (6, task.response_len)
    unpaired = task.unpaired(7, gen)
    assert unpaired["completion"].shape == (7, task.response_len)
    assert unpaired["desirable"].dtype == torch.bool and unpaired["desirable"].shape == (7,)
    text = task.heldout_text(3, gen)
    assert text.shape == (3, task.prompt_len + task.response_len)
    policy = task.new_policy()
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, task.sft_state_dict()[name])
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)    # a copy: the task's weights do not move
    assert not torch.equal(next(policy.parameters()), next(iter(task.sft_state_dict().values())))
    assert torch.equal(next(task.new_policy().parameters()),
                       next(iter(task.sft_state_dict().values())))


def test_proxy_reward_correlates_with_gold_on_heldout_samples(task):
    gen = torch.Generator().manual_seed(12345)        # not the seed the proxy was fitted with
    prompts = task.prompts(600, gen)
    responses = task.generate(task.new_policy().eval(), prompts, generator=gen)
    gold = task.gold_reward(prompts, responses)
    proxy = task.proxy_reward(prompts, responses)
    assert proxy.shape == (600,) and proxy.dtype == torch.float32 and not proxy.requires_grad
    assert spearman(gold, proxy) > 0.5
    pairs = task.preference_pairs(300, gen)
    gold_margin = (task.gold_reward(pairs["prompt"], pairs["chosen"])
                   - task.gold_reward(pairs["prompt"], pairs["rejected"]))
    proxy_margin = (task.proxy_reward(pairs["prompt"], pairs["chosen"])
                    - task.proxy_reward(pairs["prompt"], pairs["rejected"]))
    decided = gold_margin != 0
    agreement = ((gold_margin > 0) == (proxy_margin > 0))[decided].float().mean()
    assert float(agreement) > 0.75


def test_proxy_reward_can_be_over_optimised(task):
    # A run of positive adjectives looks good bigram by bigram: the proxy prefers it to the best
    # well-formed text although its gold reward is far lower (this is what RL exploits).
    det, pos, noun, stop = ids("det")[0], ids("pos")[0], ids("noun")[0], ids("stop")[0]
    prompts = torch.tensor([[task.bos_id] + [det] * (task.prompt_len - 1)] * 2)
    well_formed = ([pos, pos, noun, stop, det] * task.response_len)[: task.response_len]
    adjective_run = [pos] * task.response_len
    responses = torch.tensor([well_formed, adjective_run])
    gold = task.gold_reward(prompts, responses)
    proxy = task.proxy_reward(prompts, responses)
    assert float(gold[0]) > 0.3 and float(gold[1]) < -0.5
    assert float(proxy[1]) > float(proxy[0])


def test_preference_labels_follow_gold_with_noise(task):
    pairs = task.preference_pairs(400, torch.Generator().manual_seed(3))
    margin = (task.gold_reward(pairs["prompt"], pairs["chosen"])
              - task.gold_reward(pairs["prompt"], pairs["rejected"]))
    decided = margin[margin != 0]
    right = float((decided > 0).float().mean())
    assert 0.7 < right < 1.0           # mostly right, and noisy (some pairs flipped)


def test_unpaired_desirability_follows_gold(task):
    data = task.unpaired(400, torch.Generator().manual_seed(4))
    gold = task.gold_reward(data["prompt"], data["completion"])
    desirable = data["desirable"]
    assert 0 < int(desirable.sum()) < 400
    assert float(gold[desirable].mean()) > float(gold[~desirable].mean()) + 0.05


def test_sft_model_beats_a_random_model_on_heldout_text(task):
    text = task.heldout_text(256, torch.Generator().manual_seed(99))
    from transformers import LlamaForCausalLM

    from pyalign.tasks.task import _model_config
    random_model = LlamaForCausalLM(_model_config(task.config)).eval()
    with torch.no_grad():
        sft_ppl = math.exp(float(task.new_policy().eval()(input_ids=text, labels=text).loss))
        random_ppl = math.exp(float(random_model(input_ids=text, labels=text).loss))
    assert sft_ppl < 0.5 * random_ppl, (sft_ppl, random_ppl)
    assert sft_ppl < 20


def test_generate_greedy_matches_a_no_cache_loop(task):
    policy = task.new_policy().eval()
    prompts = task.prompts(8, torch.Generator().manual_seed(5))
    greedy = task.generate(policy, prompts, temperature=0.0)
    text = prompts
    with torch.no_grad():
        for _ in range(task.response_len):
            next_token = policy(input_ids=text).logits[:, -1].argmax(-1, keepdim=True)
            text = torch.cat([text, next_token], dim=1)
    assert torch.equal(greedy, text[:, task.prompt_len:])


def test_generate_is_seeded_and_samples_from_the_model(task):
    policy = task.new_policy().eval()
    prompts = task.prompts(400, torch.Generator().manual_seed(6))
    first = task.generate(policy, prompts, generator=torch.Generator().manual_seed(7))
    again = task.generate(policy, prompts, generator=torch.Generator().manual_seed(7))
    other = task.generate(policy, prompts, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (400, task.response_len)
    # Sampled frequencies follow softmax(logits / temperature) (4000 draws of one prompt's
    # next token; the expected L1 sampling error is about 0.06).
    one_prompt = prompts[:1].repeat(4000, 1)
    with torch.no_grad():
        logits = policy(input_ids=prompts[:1]).logits[0, -1].double()
    for temperature in (1.0, 0.5):
        draws = generate(policy, one_prompt, 1, temperature=temperature,
                         generator=torch.Generator().manual_seed(9))[:, 0]
        freqs = torch.bincount(draws, minlength=task.vocab_size).double() / len(draws)
        probs = torch.softmax(logits / temperature, -1)
        assert float((freqs - probs).abs().sum()) < 0.15, temperature
    wrong = torch.softmax(logits, -1)       # the T=0.5 draws are far from the T=1 distribution
    assert float((freqs - wrong).abs().sum()) > 0.2
    with pytest.raises(ValueError, match="temperature"):
        generate(policy, prompts, 4, temperature=-1.0)


def test_cache_hit_returns_identical_weights(task, cache_dir):
    again = make_task(0, cache_dir=cache_dir, progress=False)
    assert again.from_cache and again.cache_path == task.cache_path
    mine, theirs = task.sft_state_dict(), again.sft_state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(task.proxy_model.weight, again.proxy_model.weight)
    entries = [p for p in cache_dir.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp")
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    prompts = task.prompts(16, gen_a)
    assert torch.equal(task.proxy_reward(prompts, prompts), again.proxy_reward(prompts, prompts))
    assert torch.equal(prompts, again.prompts(16, gen_b))


def test_same_seed_same_task_and_other_seed_differs(tmp_path):
    first = make_task(1, config=SMALL, progress=False, use_cache=False)
    second = make_task(1, config=SMALL, progress=False, use_cache=False)
    other = make_task(2, config=SMALL, cache_dir=tmp_path, progress=False)
    a, b, c = first.sft_state_dict(), second.sft_state_dict(), other.sft_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(first.proxy_model.weight, second.proxy_model.weight)
    for method in ("prompts", "heldout_text", "preference_pairs", "unpaired"):
        x = getattr(first, method)(32, torch.Generator().manual_seed(0))
        y = getattr(second, method)(32, torch.Generator().manual_seed(0))
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), method
        else:
            assert torch.equal(x, y), method
    assert not torch.equal(first.heldout_text(32, torch.Generator().manual_seed(0)),
                           other.heldout_text(32, torch.Generator().manual_seed(0)))


def test_make_task_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    make_task(3, config=SMALL, cache_dir=tmp_path, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_make_task_rejects_bad_seed():
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            make_task(seed, use_cache=False, progress=False)


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    built = make_task(4, config=SMALL, cache_dir=tmp_path, progress=False)
    (built.cache_path / "sft.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rebuilt = make_task(4, config=SMALL, cache_dir=tmp_path, progress=False)
    assert not rebuilt.from_cache
    a, b = built.sft_state_dict(), rebuilt.sft_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert make_task(4, config=SMALL, cache_dir=tmp_path, progress=False).from_cache


# ---------------------------------------------------------------- the variable-length task

LENGTHY_SMALL = dict(**lengthy.LENGTHY, **MODEL_SIZES["small"], sft_steps=100, rm_pairs=500)


@pytest.fixture(scope="module")
def lengthy_tasks(cache_dir):
    """The variable-length task with the labellers' length bias, and without it (the control)."""
    return {bias: make_task(0, cache_dir=cache_dir, progress=False,
                            config=TaskConfig(**LENGTHY_SMALL, length_bias=bias))
            for bias in (0.005, 0.0)}


def test_lengthy_gold_reward_on_hand_built_responses():
    det, pos, neg = ids("det")[0], ids("pos")[1], ids("neg")[2]
    noun, verb, stop = ids("noun")[3], ids("verb")[0], ids("stop")[1]
    bos, eos, pad = language.BOS_ID, language.EOS_ID, lengthy.PAD
    cases = [
        # stop | det pos pos noun stop EOS: 5 words, 2 positive, the EOS after a stop grammatical
        ([bos, det, noun, stop], [det, pos, pos, noun, stop, eos, pad, pad], 2 / 5),
        # the same sentence twice: the same density, the same reward (length is not rewarded)
        ([bos, det, noun, stop], [det, pos, pos, noun, stop, det, pos, pos, noun, stop, eos], 4 / 10),
        # EOS after a noun is ungrammatical: (1 - 1) / 3
        ([bos, det], [pos, noun, verb, eos, pad, pad], (1 - 1) / 3),
        # what follows the first EOS does not count (as the trainers' mask): 1/2
        ([bos, det], [pos, noun, eos, neg, neg, neg], (1 - 1) / 2),
        # unfinished (no EOS within the cap): not penalised; det neg noun stop det -> -1/5
        ([bos, det], [det, neg, noun, stop, det], (0 - 1 - 1) / 5),
        # EOS first, after a prompt that ends a sentence: 0 words (counted as 1), grammatical -> 0
        ([bos, det, noun, stop], [eos, pad], 0.0),
    ]
    for prompt, response, expected in cases:
        got = lengthy.gold_reward(torch.tensor([prompt]), torch.tensor([response]))
        assert math.isclose(float(got), expected, abs_tol=1e-7), (prompt, response, float(got))
    with pytest.raises(ValueError, match="padding"):
        lengthy.gold_reward(torch.tensor([[bos, det]]), torch.tensor([[pos, pad, noun]]))
    with pytest.raises(ValueError, match="outside"):
        lengthy.gold_reward(torch.tensor([[bos, det]]), torch.tensor([[pos, -5]]))


def test_lengthy_documents_end_after_a_full_stop_with_a_skewed_length():
    lang = lengthy.make_language(0)
    prompts, responses = lengthy.documents(lang, 2000, 8, 24, torch.Generator().manual_seed(0))
    assert prompts.shape == (2000, 8) and responses.shape == (2000, 24)
    assert not bool((prompts == language.EOS_ID).any())
    is_eos = responses == language.EOS_ID
    assert bool((is_eos.sum(1) <= 1).all())
    text = torch.cat([prompts, responses.clamp_min(0)], dim=1)
    before_eos = text[:, 7:-1][is_eos]
    assert bool(torch.isin(before_eos, torch.tensor(ids("stop"))).all())  # only after a full stop
    ended = is_eos.any(1)
    padding = responses < 0
    assert torch.equal(padding.any(1), ended & ~is_eos[:, -1])      # PAD only after an EOS
    words = lengthy.word_counts(responses).double()
    unfinished = float((~ended).double().mean())
    assert 0.02 < unfinished < 0.2                                    # a few reach the cap
    assert float(words.median()) < float(words.mean())               # right-skewed
    assert 6 < float(words.mean()) < 14


def test_lengthy_sampling_pads_after_eos_and_matches_the_uncut_draws(lengthy_tasks):
    task = lengthy_tasks[0.005]
    policy = task.new_policy().eval()
    prompts = task.prompts(300, torch.Generator().manual_seed(1))
    responses = task.generate(policy, prompts, generator=torch.Generator().manual_seed(2))
    uncut = generate(policy, prompts, task.response_len, generator=torch.Generator().manual_seed(2))
    real = responses >= 0
    assert torch.equal(responses[real], uncut[real])
    first_eos = (uncut == task.eos_id).int().cumsum(1)
    assert torch.equal(real, (first_eos - (uncut == task.eos_id).int()) == 0)
    assert 0.5 < float(real.all(1).logical_not().double().mean())   # most responses end early
    from pyalign.trainers.scoring import ResponseScorer, response_mask
    assert torch.equal(response_mask(responses, None), real)       # the trainers' mask
    # the trainers' scorer gives each row of a padded batch the log-probs it has alone, unpadded
    scorer = ResponseScorer(policy, backend="eager")
    rows = [int(real[:, 0].nonzero()[0])] + [int(i) for i in (~real.all(1)).nonzero()[:3, 0]]
    with torch.no_grad():
        batch = scorer(prompts[rows], responses[rows], real[rows])
        for i, row in enumerate(rows):
            length = int(real[row].sum())
            alone = scorer(prompts[row:row + 1], responses[row:row + 1, :length], real[row:row + 1, :length])
            torch.testing.assert_close(batch[i, :length], alone[0], rtol=1e-5, atol=1e-5)
            assert bool((batch[i, length:] == 0).all())
    text = task.heldout_text(64, torch.Generator().manual_seed(3))
    assert text.shape == (64, task.prompt_len + task.response_len) and bool((text < 0).any())


def test_lengthy_proxy_learns_the_labellers_length_bias_and_gold_does_not_reward_length(lengthy_tasks):
    biased, control = lengthy_tasks[0.005], lengthy_tasks[0.0]
    gen = torch.Generator().manual_seed(4)
    prompts = biased.prompts(1500, gen)
    responses = biased.generate(biased.new_policy().eval(), prompts, generator=gen)
    words = lengthy.word_counts(responses).double()

    def slope(y):
        centred = words - words.mean()
        return float((centred * (y.double() - y.double().mean())).sum() / centred.square().sum())
    bias = biased.config.length_bias
    assert abs(slope(biased.gold_reward(prompts, responses))) < 0.3 * bias
    # the proxy fitted on the biased labels rewards length; the same fit on unbiased labels
    # does not: the bias comes from the data, not from the proxy's formula
    assert slope(biased.proxy_reward(prompts, responses)) > 0.5 * bias
    assert abs(slope(control.proxy_reward(prompts, responses))) < 0.4 * bias
    assert 0.53 < biased.stats["chosen_longer"] < 0.7 and abs(control.stats["chosen_longer"] - 0.5) < 0.05
    pairs = biased.preference_pairs(400, gen)
    longer = lengthy.word_counts(pairs["chosen"]) - lengthy.word_counts(pairs["rejected"])
    assert float((longer > 0).double().sum() / (longer != 0).double().sum()) > 0.5


def test_model_sizes_grow_and_bad_task_fields_are_named():
    counts = []
    for name in ("small", "base", "large"):
        config = TaskConfig(**MODEL_SIZES[name], sft_steps=1, rm_pairs=8)
        from pyalign.tasks.task import _new_model
        counts.append(sum(p.numel() for p in _new_model(config, 0).parameters()))
    assert counts[0] * 2 < counts[1] and counts[1] * 2 < counts[2]
    for field, value, accepted in (("length_bias", -0.1, ">= 0"), ("variable_length", 1, "true or false"),
                                   ("response_len", 0, "> 0")):
        with pytest.raises(ValueError, match=f"task.{field}' must be {accepted}"):
            make_task(0, config=TaskConfig(**{field: value}), use_cache=False, progress=False)
