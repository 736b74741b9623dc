"""The embedded task: a tiny SFT model, a gold reward and a proxy reward model, built from a seed.

``make_task(seed)`` builds (or loads from the on-disk cache) everything an alignment run needs
without downloads: the base language (language.py), a 2-layer LlamaForCausalLM pre-trained on it
as the SFT/initial policy, and a proxy reward model fitted on noisy preference pairs sampled from
that SFT model and labelled by the gold reward (proxy.py). Building takes a few seconds on CPU;
the cache makes the second call take milliseconds.

``TaskConfig(variable_length=True)`` is the variant whose responses end at EOS and whose
labellers like length (lengthy.py); ``MODEL_SIZES`` names three sizes of the SFT model.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pyalign._kv_cache import sampling_cache
from pyalign._utils import atomic_write, cache_root, limited_threads

from . import language, lengthy
from .language import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, Language
from .proxy import ProxyRewardModel, fit_bradley_terry


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Sizes and budgets of the embedded task. Every field is part of the cache key."""
    prompt_len: int = 8               # includes the leading bos
    response_len: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    sft_steps: int = 200
    sft_batch: int = 64
    sft_lr: float = 5e-3
    rm_pairs: int = 2000              # noisy preference pairs the proxy is fitted on
    rm_l2: float = 1e-3
    label_noise: float = 0.05         # P(a preferred to b) = sigmoid((gold_a - gold_b) / label_noise)
    variable_length: bool = False     # responses end at EOS; response_len is their cap (lengthy.py)
    length_bias: float = 0.0025       # variable_length: what the labellers add per word (lengthy.py)

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its range."""
        ranges = {"prompt_len": (">= 2 (the bos token and at least one more)", lambda v: v >= 2),
                  "rm_l2": (">= 0", lambda v: v >= 0), "length_bias": (">= 0", lambda v: v >= 0),
                  "variable_length": ("true or false", lambda v: isinstance(v, bool))}
        for key, value in dataclasses.asdict(self).items():
            accepted, ok = ranges.get(key, ("> 0", lambda v: v > 0))
            if not ok(value):
                raise ValueError(f"key 'task.{key}' must be {accepted}, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"key 'task.hidden_size' must be a multiple of task.num_heads "
                             f"({self.num_heads}), got {self.hidden_size!r}")


# The model-size ladder: TaskConfig fields of three SFT models, "base" the default task's. Each
# step is 4-6x the parameters (small 25k, base 90k, large 0.51M with the embeddings; a study
# point's CPU time at each size: docs/study/RERUN.md). All three reach the same held-out
# perplexity on this language (within 1%).
MODEL_SIZES = {
    "small": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "base": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
    "large": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "intermediate_size": 256},
}


def _source_digest() -> str:
    """Hash of this package's source: a change to the task code invalidates the cache."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_root(cache_dir) -> Path:
    # An explicit cache_dir wins; otherwise pyalign's shared cache root.
    return Path(cache_dir) if cache_dir is not None else cache_root("tasks")


def _model_config(config: TaskConfig):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.prompt_len + config.response_len,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, rms_norm_eps=1e-5)


def _new_model(config: TaskConfig, seed: int):
    from transformers import LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):   # seeded init, without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(_model_config(config))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _generator_or_default(generator):
    return torch.default_generator if generator is None else generator


def _one_thread():
    # The task's matrices are tiny: extra intra-op threads only add synchronisation, and on a
    # shared, oversubscribed machine they stall (10x-50x slower). One thread also makes the
    # build's floating-point results independent of the machine's core count.
    return limited_threads(1)


def sample_next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator
                      ) -> torch.Tensor:
    """LongTensor[n] on the CPU: one token per row of the [n, V] last-position ``logits``, greedy
    at temperature 0, else drawn on ``generator`` (the probabilities moved to its device)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits / temperature, dim=-1).to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).cpu()


@torch.no_grad()
def generate(model, prompts: torch.Tensor, response_len: int, *, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample exactly ``response_len`` tokens after each prompt, with a KV cache.

    temperature 0 is greedy decoding. Sampling draws on ``generator`` (a CPU generator; the
    probabilities are moved to its device when the model lives elsewhere). Returns a
    LongTensor[n, response_len] on the prompts' device."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if prompts.dim() != 2 or prompts.dtype != torch.long:
        raise ValueError(f"prompts must be a LongTensor[n, prompt_len], got {prompts.dtype} "
                         f"{tuple(prompts.shape)}")
    generator = _generator_or_default(generator)
    device = next(model.parameters()).device
    responses = torch.empty(prompts.shape[0], response_len, dtype=torch.long)
    if prompts.shape[0] == 0 or response_len == 0:
        return responses.to(prompts.device)
    cache = sampling_cache(model)
    out = model(input_ids=prompts.to(device), use_cache=True, **cache)
    for i in range(response_len):
        tokens = sample_next_token(out.logits[:, -1], temperature, generator)
        responses[:, i] = tokens
        if i + 1 < response_len:
            out = model(input_ids=tokens[:, None].to(device), use_cache=True, **cache)
    return responses.to(prompts.device)


def _sample(model, prompts: torch.Tensor, config: TaskConfig, *, temperature: float = 1.0,
            generator=None) -> torch.Tensor:
    """The task's responses of ``model``: response_len tokens, or (variable_length) up to the
    first EOS, PAD after it."""
    responses = generate(model, prompts, config.response_len, temperature=temperature,
                         generator=generator)
    return lengthy.end_at_eos(responses) if config.variable_length else responses


def _gold(config: TaskConfig, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    if config.variable_length:
        return lengthy.gold_reward(prompts, responses)
    return language.gold_reward(prompts, responses)


def _judged(config: TaskConfig, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """What the noisy labellers rank by: the gold reward, plus the length they like in the
    variable-length task (lengthy.py)."""
    if config.variable_length:
        return lengthy.judged_reward(prompts, responses, config.length_bias)
    return language.gold_reward(prompts, responses)


def _noisy_preference(gold_a, gold_b, label_noise: float, generator) -> torch.Tensor:
    """BoolTensor: a preferred to b, drawn with probability sigmoid((gold_a - gold_b) / noise)."""
    prob_a = torch.sigmoid((gold_a - gold_b) / label_noise)
    return torch.rand(gold_a.shape, generator=generator) < prob_a


def _sample_pairs(model, lang: Language, config: TaskConfig, n: int, generator) -> dict:
    """Two samples of ``model`` per base-language prompt, ordered by a noisy judged preference
    (``_judged``: the gold reward, in the fixed-length task)."""
    prompts = lang.sample(n, config.prompt_len, generator)
    both = _sample(model, prompts.repeat(2, 1), config, generator=generator)
    first, second = both[:n], both[n:]
    gold_first = _gold(config, prompts, first)
    gold_second = _gold(config, prompts, second)
    if config.variable_length:
        first_wins = _noisy_preference(_judged(config, prompts, first), _judged(config, prompts, second),
                                       config.label_noise, generator)
    else:
        first_wins = _noisy_preference(gold_first, gold_second, config.label_noise, generator)
    return {"prompt": prompts,
            "chosen": torch.where(first_wins[:, None], first, second),
            "rejected": torch.where(first_wins[:, None], second, first),
            "chosen_gold": torch.where(first_wins, gold_first, gold_second),
            "rejected_gold": torch.where(first_wins, gold_second, gold_first)}


class Task:
    """The embedded alignment task (see the package docstring). Build it with ``make_task``."""

    def __init__(self, seed: int, config: TaskConfig, sft_state: dict, proxy_state: dict,
                 stats: dict, from_cache: bool = False, cache_path: Path | None = None):
        self.seed = seed
        self.config = config
        self.vocab_size = VOCAB_SIZE
        self.prompt_len = config.prompt_len
        self.response_len = config.response_len
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self.categories = language.category_token_ids()   # category name -> token ids
        self.language = lengthy.make_language(seed) if config.variable_length else Language(seed)
        self.stats = dict(stats)      # numbers measured while building (losses, gold means)
        self.from_cache = from_cache
        self.cache_path = cache_path
        self._sft_state = {k: v.detach().clone() for k, v in sft_state.items()}
        self._sft_model = _new_model(config, 0)
        self._sft_model.load_state_dict(self._sft_state)
        self._sft_model.eval().requires_grad_(False)
        self.proxy_model = ProxyRewardModel(VOCAB_SIZE)
        self.proxy_model.load_state_dict(proxy_state)
        self.proxy_model.requires_grad_(False)

    def __repr__(self) -> str:
        return (f"Task(seed={self.seed}, vocab_size={self.vocab_size}, prompt_len={self.prompt_len}, "
                f"response_len={self.response_len}, from_cache={self.from_cache})")

    # models
    def new_policy(self):
        """A fresh, trainable copy of the SFT model (LlamaForCausalLM, train mode)."""
        model = copy.deepcopy(self._sft_model)
        return model.train().requires_grad_(True)

    def sft_state_dict(self) -> dict:
        """The SFT (initial) weights, as a fresh copy."""
        return {k: v.clone() for k, v in self._sft_state.items()}

    # data
    def prompts(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """LongTensor[n, prompt_len]: base-language document openings (bos first)."""
        return self.language.sample(n, self.prompt_len, _generator_or_default(generator))

    def heldout_text(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """LongTensor[n, prompt_len + response_len]: base-language documents (for perplexity);
        in the variable-length task whole documents, padded with -100 after their EOS."""
        generator = _generator_or_default(generator)
        if self.config.variable_length:
            return lengthy.heldout_documents(self.language, n, self.prompt_len, self.response_len,
                                             generator)
        return self.language.sample(n, self.prompt_len + self.response_len, generator)

    def generate(self, model, prompts: torch.Tensor, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """LongTensor[n, response_len] sampled from ``model`` after ``prompts`` (in the
        variable-length task: -100 after each response's first EOS)."""
        return _sample(model, prompts, self.config, temperature=temperature, generator=generator)

    def preference_pairs(self, n: int, generator: torch.Generator | None = None) -> dict:
        """dict(prompt=[n,P], chosen=[n,R], rejected=[n,R]): two SFT samples per prompt,
        ordered by a noisy gold label (P(a chosen) = sigmoid((gold_a - gold_b) / label_noise))."""
        with _one_thread():
            pairs = _sample_pairs(self._sft_model, self.language, self.config, n,
                                  _generator_or_default(generator))
        return {key: pairs[key] for key in ("prompt", "chosen", "rejected")}

    def unpaired(self, n: int, generator: torch.Generator | None = None) -> dict:
        """dict(prompt, completion, desirable): one SFT sample per prompt, marked desirable with
        probability sigmoid((judged - its SFT mean) / label_noise) (KTO data; judged: the gold
        reward, plus the labellers' length bias in the variable-length task)."""
        generator = _generator_or_default(generator)
        prompts = self.prompts(n, generator)
        with _one_thread():
            completions = self.generate(self._sft_model, prompts, generator=generator)
        judged = _judged(self.config, prompts, completions)
        baseline = torch.full_like(judged, self.stats.get("sft_judged_mean", self.stats["sft_gold_mean"]))
        desirable = _noisy_preference(judged, baseline, self.config.label_noise, generator)
        return {"prompt": prompts, "completion": completions, "desirable": desirable}

    # rewards
    def gold_reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """FloatTensor[n]: the exact gold reward (pyalign.tasks.language; lengthy.py in the
        variable-length task)."""
        return _gold(self.config, prompts, responses)

    def proxy_reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """FloatTensor[n]: the fitted proxy reward model's score (in gold units; no grad)."""
        language._check_tokens(prompts, "prompts")
        if self.config.variable_length:
            lengthy.check_responses(responses)
            return self.proxy_model(prompts.cpu(), lengthy.end_at_eos(responses.cpu()))
        language._check_tokens(responses, "responses")
        return self.proxy_model(prompts.cpu(), responses.cpu())


# building

def _train_sft(config: TaskConfig, lang: Language, seed: int, progress: bool):
    model = _new_model(config, seed)
    model.train()
    generator = _generator(seed * 1_000_003 + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, betas=(0.9, 0.98),
                                  weight_decay=0.0)
    warmup = max(1, config.sft_steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, config.sft_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    seq_len = config.prompt_len + config.response_len
    losses = []
    steps = range(config.sft_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"pyalign.tasks: SFT model (seed {seed})", leave=False,
                     file=sys.stderr)
    with torch.enable_grad():
        for _ in steps:
            if config.variable_length:
                batch, labels = lengthy.sft_batch(lang, config.sft_batch, config.prompt_len,
                                                  config.response_len, generator)
            else:
                batch = labels = lang.sample(config.sft_batch, seq_len, generator)
            loss = model(input_ids=batch, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    return model, losses


def _build(seed: int, config: TaskConfig, progress: bool):
    with _one_thread():
        return _build_single_threaded(seed, config, progress)


def _build_single_threaded(seed: int, config: TaskConfig, progress: bool):
    started, started_cpu = time.perf_counter(), time.process_time()
    lang = lengthy.make_language(seed) if config.variable_length else Language(seed)
    model, losses = _train_sft(config, lang, seed, progress)
    sft_seconds = time.perf_counter() - started
    pairs = _sample_pairs(model, lang, config, config.rm_pairs, _generator(seed * 1_000_003 + 2))
    proxy = ProxyRewardModel(VOCAB_SIZE)
    rm_loss = fit_bradley_terry(proxy, pairs["prompt"], pairs["chosen"], pairs["rejected"],
                                l2=config.rm_l2)
    # Put the proxy in gold units: the fitted logit difference estimates (judged_a - judged_b) /
    # label_noise (judged: the gold reward, plus the labellers' length bias in the variable-length
    # task), and the bias makes the means agree with gold on the SFT samples.
    gold_all = torch.cat([pairs["chosen_gold"], pairs["rejected_gold"]])
    with torch.no_grad():
        logits_all = torch.cat([proxy.logits(pairs["prompt"], pairs["chosen"]),
                                proxy.logits(pairs["prompt"], pairs["rejected"])])
        proxy.scale.fill_(config.label_noise)
        proxy.bias.fill_(float(gold_all.mean() - config.label_noise * logits_all.mean()))
    agree = pairs["chosen_gold"] >= pairs["rejected_gold"]
    stats = {
        "sft_loss_first": losses[0], "sft_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "sft_seconds": sft_seconds, "build_seconds": time.perf_counter() - started,
        "build_cpu_seconds": time.process_time() - started_cpu,
        "sft_gold_mean": float(gold_all.mean()), "sft_gold_std": float(gold_all.std()),
        "rm_loss": rm_loss, "rm_label_agreement": float(agree.float().mean()),
    }
    if config.variable_length:
        stats.update(lengthy.length_stats(pairs, proxy, config.length_bias))
    sft_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return sft_state, proxy.state_dict(), stats


def _save_atomically(path: Path, sft_state: dict, proxy_state: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        torch.save(sft_state, tmp / "sft.pt")
        torch.save(proxy_state, tmp / "proxy.pt")
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, path)      # atomic; fails when another process got there first
        except OSError:
            if (path / "meta.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:                     # a broken entry: replace it
                shutil.rmtree(path, ignore_errors=True)
                os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(path: Path):
    meta = json.loads((path / "meta.json").read_text())
    sft_state = torch.load(path / "sft.pt", map_location="cpu", weights_only=True)
    proxy_state = torch.load(path / "proxy.pt", map_location="cpu", weights_only=True)
    return sft_state, proxy_state, meta


def cache_key(seed: int, config: TaskConfig) -> str:
    """The cache entry name: a hash of the seed, the config and the task source code."""
    blob = json.dumps({"seed": seed, "config": dataclasses.asdict(config),
                       "source": _source_digest(), "torch": torch.__version__.split("+")[0]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def make_task(seed: int = 0, *, cache_dir=None, progress: bool = True,
              config: TaskConfig | None = None, use_cache: bool = True) -> Task:
    """Build the embedded task for ``seed`` (deterministic), or load it from the disk cache.

    cache_dir defaults to ``pyalign._utils.cache_root("tasks")`` ($PYALIGN_CACHE_DIR/tasks, else
    ~/.cache/pyalign/tasks); an entry is a directory named by ``cache_key`` and written
    atomically (meta.json, written last, marks it complete). ``config`` overrides the sizes
    (TaskConfig); ``use_cache=False`` builds without reading or writing the cache."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    config = config or TaskConfig()
    config.validate()
    path = _cache_root(cache_dir) / cache_key(seed, config)
    if use_cache and (path / "meta.json").exists():
        try:
            sft_state, proxy_state, meta = _load(path)
            return Task(seed, config, sft_state, proxy_state, meta["stats"], from_cache=True,
                        cache_path=path)
        except Exception as exc:  # a damaged entry: rebuild it
            warnings.warn(f"pyalign.tasks: cache entry {path} unreadable ({exc}); rebuilding",
                          RuntimeWarning, stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)
    sft_state, proxy_state, stats = _build(seed, config, progress)
    if progress:
        print(f"pyalign.tasks: built task seed {seed} in {stats['build_seconds']:.1f}s "
              f"(SFT loss {stats['sft_loss_first']:.2f} -> {stats['sft_loss_last']:.2f})",
              file=sys.stderr)
    if use_cache:
        meta = {"seed": seed, "config": dataclasses.asdict(config), "stats": stats}
        try:
            _save_atomically(path, sft_state, proxy_state, meta)
        except OSError as exc:
            warnings.warn(f"pyalign.tasks: could not write the cache entry {path} ({exc})",
                          RuntimeWarning, stacklevel=2)
    return Task(seed, config, sft_state, proxy_state, stats, from_cache=False,
                cache_path=path if use_cache else None)
