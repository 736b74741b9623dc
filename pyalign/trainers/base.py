"""What every pyalign trainer shares: the step loop, distributed set-up, scoring of responses
with pyalign's fused log-prob ops, evaluation (gold/proxy reward and KL to the initial model on
policy samples), JSONL + tqdm logging, atomic checksummed checkpoints with the RNG and data
position, and the gold-reward-vs-KL plot.

Determinism: every random draw of the training loop comes from a ``torch.Generator`` seeded by
``(seed, purpose, step, chunk)`` (see ``make_generator``), never from a stateful stream, so a run
resumed from a checkpoint, or split over more ranks, draws exactly what an uninterrupted
single-process run draws. The global RNG states are checkpointed too, for user code and models
that use them (dropout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

import pyalign

IGNORE_INDEX = -100
CHECKPOINT_FORMAT = "pyalign-trainer-checkpoint"
CHECKPOINT_VERSION = 1
_MAGIC = b"PYALIGN-CKPT\x00v1\n"  # then 8-byte payload length, 32-byte sha256, payload (torch.save)
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Config fields that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "keep_checkpoints", "progress"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or from an incompatible run."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class TrainerConfig:
    """Settings common to every trainer. Batch sizes are global (summed over ranks)."""

    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 32  # examples (preference) or prompts (RL) per optimizer step, all ranks
    micro_batch_size: int = 32  # per forward/backward on one rank; gradient accumulation fills the rest
    max_grad_norm: float = 1.0  # 0 disables clipping
    temperature: float = 1.0  # sampling temperature (RL rollouts and evaluation)
    eval_every: int = 1  # evaluate gold/proxy reward and KL on policy samples every N steps (0: never)
    eval_batch_size: int = 64  # prompts per evaluation
    final_eval_batch_size: int = 256  # prompts in the evaluation after the last step
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    bf16: bool = False  # bf16 autocast for the policy and reference forwards
    backend: str = "auto"  # pyalign op backend
    fused_linear: bool = True  # log-probs from the last hidden state and lm_head (no logits tensor)
    fsdp: bool = False  # shard the policy/reference with FSDP2 (fully_shard) instead of DDP
    mask_after_eos: bool = False  # score responses only up to their first EOS (the embedded task
    # scores all response_len tokens, so by default every token counts)
    progress: bool = True

    def validate(self) -> None:
        positive = ("lr", "batch_size", "micro_batch_size", "temperature", "eval_batch_size",
                    "final_eval_batch_size", "keep_checkpoints")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"config key {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.backend not in pyalign.backends.CHOICES:
            raise ValueError(f"backend must be one of {pyalign.backends.BACKENDS + ('auto',)}, "
                             f"got {self.backend!r}")


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# randomness


def stable_seed(*keys) -> int:
    """A 63-bit seed from any printable keys, the same in every process and Python version."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*keys))


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# distributed


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            # Every rank reaches this point before any tears down its gloo pairs: a rank that
            # destroys the group while a peer still talks to it aborts the peer (SIGABRT).
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed() -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and os.environ.get("PYALIGN_DEVICE", "") != "cpu"
    if world_size <= 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                       owns_group=owns)


def split_evenly(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        raise ValueError(f"{what} ({total}) must be divisible by the number of ranks ({world_size})")
    return total // world_size


def micro_slices(local_size: int, micro_size: int) -> list[slice]:
    micro_size = min(micro_size, local_size)
    if local_size % micro_size:
        raise ValueError(f"the per-rank batch ({local_size}) must be a multiple of "
                         f"micro_batch_size ({micro_size})")
    return [slice(i, i + micro_size) for i in range(0, local_size, micro_size)]


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:06d}.pt")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file in the same directory, fsync, os.replace.

    A crash at any point leaves either the old file set or the complete new file, never a
    partial file under a checkpoint name.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(_MAGIC)
            handle.write(len(data).to_bytes(8, "little"))
            handle.write(hashlib.sha256(data).digest())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(directory)


def load_checkpoint(path: str) -> dict:
    """Read and verify a checkpoint; any damage raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    header = len(_MAGIC) + 8 + 32
    if len(raw) < header or not raw.startswith(_MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint or is "
                              f"truncated ({len(raw)} bytes)")
    length = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 8], "little")
    digest = raw[len(_MAGIC) + 8:header]
    data = raw[header:]
    if len(data) != length:
        raise CheckpointError(f"checkpoint {path} is partial: {len(data)} of {length} payload bytes")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a valid checksum over bytes torch cannot read
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pyalign trainer checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, "
                              f"this pyalign reads version {CHECKPOINT_VERSION}")
    return payload


def resolve_resume_path(resume: str | bool, checkpoint_dir: str) -> str:
    """The file to resume from: an explicit path, or the newest checkpoint in checkpoint_dir."""
    if isinstance(resume, str) and resume not in ("", "latest"):
        if not os.path.isfile(resume):
            raise CheckpointError(f"checkpoint {resume} does not exist")
        return resume
    found = list_checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint (step-NNNNNN.pt) in {checkpoint_dir}")
    return found[-1][1]


# ---------------------------------------------------------------------------------------------
# logging and plotting


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines after the checkpoint's step
    (logged by the interrupted run after its last checkpoint) are dropped, so the file reads as
    one uninterrupted run."""

    def __init__(self, path: Optional[str], *, resume_step: Optional[int] = None):
        self.path = path
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if record.get("step", 0) <= resume_step and not record.get("final"):
                            kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.writelines(kept)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_reward_vs_kl(records: list[dict], path: str, title: str) -> Optional[str]:
    """Gold (else proxy) reward against KL to the initial model, one point per evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_key = "gold_reward" if any("gold_reward" in r for r in records) else "proxy_reward"
    points = [(r["kl_to_init"], r[reward_key], r["step"]) for r in records
              if "kl_to_init" in r and reward_key in r and not r.get("final")]
    if not points:
        return None
    kls, rewards, steps = zip(*points)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(kls, rewards, color="0.7", linewidth=0.8, zorder=1)
    scatter = ax.scatter(kls, rewards, c=steps, cmap="viridis", s=14, zorder=2)
    fig.colorbar(scatter, ax=ax, label="step")
    final = [r for r in records if r.get("final") and "kl_to_init" in r and reward_key in r]
    if final:
        ax.scatter([final[-1]["kl_to_init"]], [final[-1][reward_key]], marker="*", s=120,
                   color="crimson", zorder=3, label="final evaluation")
        ax.legend(loc="best")
    ax.set_xlabel("KL(policy || initial model), nats per response")
    ax.set_ylabel(reward_key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# scoring responses


def response_mask(responses: torch.Tensor, eos_id: Optional[int]) -> torch.Tensor:
    """True up to and including the first EOS of each response (all True when there is none)."""
    if eos_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_eos = (responses == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=-1) - is_eos) == 0


class ResponseScorer(torch.nn.Module):
    """Per-token log-probs (and entropies) of response tokens given prompts, via pyalign's ops.

    With ``fused_linear`` the logits are never materialised: the causal LM's last hidden state
    and lm_head weight go to ``pyalign.linear_token_logprobs``. Wrapping this module (not the
    bare model) in DDP/FSDP keeps the lm_head inside the wrapped forward.
    """

    def __init__(self, model: torch.nn.Module, *, fused_linear: bool = True, backend: str = "auto",
                 temperature: float = 1.0, bf16: bool = False):
        super().__init__()
        self.model = model
        config = getattr(model, "config", None)
        capped = bool(getattr(config, "final_logit_softcapping", None)) or \
            getattr(config, "logit_scale", None) not in (None, 1.0)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.fused_linear = bool(fused_linear and head is not None and not capped
                                 and hasattr(model, "base_model") and model.base_model is not model)
        self.backend = backend
        self.temperature = float(temperature)
        self.bf16 = bool(bf16)

    def _autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
                entropy: bool = False):
        input_ids = torch.cat([prompts, responses], dim=1)
        start = prompts.shape[1] - 1
        labels = responses.masked_fill(~mask, IGNORE_INDEX)
        with self._autocast(input_ids.device):
            if self.fused_linear:
                hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
                hidden = hidden[:, start:start + responses.shape[1]]
                head = self.model.get_output_embeddings()
                weight = head.weight.to(hidden.dtype)
                bias = getattr(head, "bias", None)
                bias = bias.to(hidden.dtype) if bias is not None else None
                return pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias,
                                                     temperature=self.temperature, entropy=entropy,
                                                     backend=self.backend)
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            logits = logits[:, start:start + responses.shape[1]]
            return pyalign.token_logprobs(logits, labels, temperature=self.temperature,
                                          entropy=entropy, backend=self.backend)


# ---------------------------------------------------------------------------------------------
# the trainer


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class Trainer:
    """The loop shared by PreferenceTrainer and RLTrainer.

    Subclasses implement ``_make_reference``, ``_make_strategy``, ``_build_data``,
    ``train_step(step)`` returning a
    dict of global (all-rank) metrics, and ``_extra_state`` / ``_load_extra_state``.
    """

    algo = "trainer"

    def __init__(self, task, config: TrainerConfig, *, algo: Optional[str] = None,
                 out_dir: Optional[str] = None, model_factory: Optional[Callable[[], torch.nn.Module]] = None,
                 dist_ctx: Optional[DistContext] = None):
        config.validate()
        self.task = task
        self.config = config
        if algo is not None:
            self.algo = algo
        self.out_dir = out_dir
        self.dist = dist_ctx or init_distributed()
        self.model_factory = model_factory or task.new_policy
        self.step = 0
        torch.manual_seed(stable_seed(config.seed, "init"))
        random.seed(stable_seed(config.seed, "python"))
        np.random.seed(stable_seed(config.seed, "numpy") % (2 ** 32))

        self.policy = self.model_factory().to(self.dist.device)
        self.policy.train()
        self.init_model = _freeze(self.model_factory().to(self.dist.device))
        self.ref_model = self._make_reference()
        temperature = self._score_temperature()

        def scorer_for(model):
            return ResponseScorer(model, fused_linear=config.fused_linear, backend=config.backend,
                                  temperature=temperature, bf16=config.bf16)

        self.scorer = self._wrap(scorer_for(self.policy), trainable=True)
        self.ref_scorer = self._wrap(scorer_for(self.ref_model), trainable=False)
        self.init_scorer = (self.ref_scorer if self.init_model is self.ref_model
                            else self._wrap(scorer_for(self.init_model), trainable=False))
        # Built after wrapping: FSDP2 replaces parameters by DTensors, which the strategies hold.
        self.ref_strategy = self._make_strategy()
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                           lr=config.lr, weight_decay=config.weight_decay)
        self._eval_prompts = task.prompts(config.eval_batch_size, make_generator(config.seed, "eval-prompts"))
        self._final_prompts = task.prompts(config.final_eval_batch_size,
                                           make_generator(config.seed, "final-eval-prompts"))
        self._build_data()

    # -- hooks for subclasses -----------------------------------------------------------------
    def _make_reference(self) -> torch.nn.Module:
        """The model the loss/penalty compares against; self.init_model unless it moves."""
        return self.init_model

    def _make_strategy(self):
        return pyalign.refmodel.Frozen(self.ref_model)

    def _build_data(self) -> None:
        pass

    def _score_temperature(self) -> float:
        return 1.0

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # -- distributed wrapping -----------------------------------------------------------------
    @property
    def _sharded(self) -> bool:
        return self.config.fsdp and self.dist.distributed

    def _wrap(self, scorer: ResponseScorer, *, trainable: bool) -> torch.nn.Module:
        """DDP for the trained scorer; under FSDP2 every model is sharded the same way (layers,
        then the scorer as root) so reference updates between them stay shard-local."""
        if not self.dist.distributed:
            return scorer
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard
            for layer in _decoder_layers(scorer.model):
                fully_shard(layer)
            # reshard the root after forward too (its default is to keep it gathered for the
            # backward): the reference/EMA updates must see every model as shards.
            fully_shard(scorer, reshard_after_forward=True)
            # One forward through the root before anything calls the bare model (generate):
            # FSDP2 initialises its root on the first forward and refuses a layer-first one.
            with torch.no_grad():
                token = torch.full((1, 1), self.task.bos_id, dtype=torch.long, device=self.dist.device)
                scorer(token, token, torch.ones_like(token, dtype=torch.bool))
            return scorer
        if not trainable:
            return scorer
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(scorer, device_ids=device_ids)

    @contextlib.contextmanager
    def _unsharded(self, scorer: torch.nn.Module):
        """Plain (gathered) parameters for code that calls the bare model outside the scorer's
        forward (task.generate). A no-op without FSDP."""
        if not hasattr(scorer, "unshard"):
            yield
            return
        scorer.unshard()
        try:
            yield
        finally:
            scorer.reshard()

    @contextlib.contextmanager
    def _accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch."""
        if not last and hasattr(self.scorer, "no_sync"):
            with self.scorer.no_sync():
                yield
        elif not last and hasattr(self.scorer, "set_requires_gradient_sync"):
            self.scorer.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.scorer.set_requires_gradient_sync(True)
        else:
            yield

    # -- optimisation ---------------------------------------------------------------------------
    def _optimizer_step(self, step: int) -> float:
        cfg = self.config
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _reduce_means(self, sums: dict[str, float], counts: dict[str, str]) -> dict:
        """All-reduce metric sums (and their counts) over ranks; return means keyed by name."""
        names = sorted(sums)
        totals = self.dist.all_reduce_sum(torch.tensor([float(sums[n]) for n in names], dtype=torch.float64))
        by_name = dict(zip(names, totals.tolist()))
        out = {}
        for name, count_name in counts.items():
            if by_name.get(count_name, 0) > 0 and name in by_name:
                out[name] = by_name[name] / by_name[count_name]
        return out

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, prompts: torch.Tensor, key: Any) -> dict:
        """Sample from the policy on ``prompts`` (this rank's share), score them; global means.

        Sampling is chunked by micro_batch_size with one generator per global chunk, so the
        numbers do not depend on the number of ranks.
        """
        cfg, task = self.config, self.task
        local = split_evenly(prompts.shape[0], self.dist.world_size, "the evaluation batch")
        offset = self.dist.rank * local
        sums = dict(gold=0.0, proxy=0.0, kl=0.0, entropy=0.0, tokens=0.0, n=0.0)
        chunk_size = min(cfg.micro_batch_size, local)
        self.policy.eval()
        try:
            for start in range(0, local, chunk_size):
                chunk = prompts[offset + start: offset + min(start + chunk_size, local)].to(self.dist.device)
                generator = make_generator(cfg.seed, "eval", key, (offset + start) // chunk_size)
                with self._unsharded(self.scorer):
                    responses = task.generate(self.policy, chunk, temperature=cfg.temperature,
                                              generator=generator).to(self.dist.device)
                mask = self.response_mask(responses)
                logprobs, entropy = self._scorer_module()(chunk, responses, mask, entropy=True)
                init_logprobs = self.init_scorer(chunk, responses, mask)
                kl = pyalign.kl_penalty(logprobs, init_logprobs, estimator="k3", mask=mask)
                if hasattr(task, "gold_reward"):
                    sums["gold"] += float(task.gold_reward(chunk.cpu(), responses.cpu()).double().sum())
                sums["proxy"] += float(task.proxy_reward(chunk.cpu(), responses.cpu()).double().sum())
                sums["kl"] += float(kl.double().sum())
                sums["entropy"] += float((entropy * mask).double().sum())
                sums["tokens"] += float(mask.sum())
                sums["n"] += chunk.shape[0]
        finally:
            self.policy.train()
        counts = dict(proxy="n", kl="n", entropy="tokens", tokens="n")
        if hasattr(task, "gold_reward"):
            counts["gold"] = "n"
        means = self._reduce_means(sums, counts)
        renamed = dict(gold="gold_reward", proxy="proxy_reward", kl="kl_to_init",
                       entropy="sample_entropy", tokens="response_length")
        return {renamed[k]: v for k, v in means.items()}

    def response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        return response_mask(responses, self.task.eos_id if self.config.mask_after_eos else None)

    def _scorer_module(self) -> torch.nn.Module:
        return getattr(self.scorer, "module", self.scorer)

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Optional[str]:
        return os.path.join(self.out_dir, "checkpoints") if self.out_dir else None

    def _model_state(self, model: torch.nn.Module) -> dict:
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _load_model_state(self, model: torch.nn.Module, state: dict) -> None:
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=False))
            return
        model.load_state_dict(state)

    def _optimizer_state(self) -> dict:
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(self.scorer, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict) -> None:
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.scorer, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
            return
        self.optimizer.load_state_dict(state)

    def state_payload(self) -> dict:
        """Everything needed to continue bit-for-bit (collective under FSDP: call on all ranks)."""
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "algo": self.algo,
            "step": self.step, "world_size": self.dist.world_size,
            "config": config_to_dict(self.config),
            "policy": self._model_state(self._scorer_module()),
            "optimizer": self._optimizer_state(),
            "rng": capture_rng_state(),
            "trainer": self._extra_state(),
        }
        # The strategy's state holds the moving weights (trust-region reference, EMA) by itself.
        payload["reference_strategy"] = self._strategy_state()
        return payload


    def _policy_params(self) -> dict:
        # the strategies name tensors by the policy's parameter names, wrapper prefixes removed
        return {".".join(p for p in name.split(".") if p not in ("module", "_orig_mod")): param
                for name, param in self.policy.named_parameters()}

    def _strategy_state(self) -> dict:
        """The strategy's state; under FSDP2 its per-rank shards are gathered to full tensors
        (a collective), so the checkpoint does not depend on the number of ranks."""
        state = self.ref_strategy.state_dict()
        if not self._sharded:
            return state
        params = self._policy_params()
        return {key: ({name: _gather_shard(params[name], shard) for name, shard in value.items()}
                      if _is_tensor_dict(value) else value) for key, value in state.items()}

    def _load_strategy_state(self, state: dict) -> None:
        if self._sharded:
            params = self._policy_params()
            state = {key: ({name: _local_shard(params[name], full) for name, full in value.items()}
                           if _is_tensor_dict(value) else value) for key, value in state.items()}
        self.ref_strategy.load_state_dict(state)

    def save(self) -> Optional[str]:
        if not self.checkpoint_dir:
            return None
        payload = self.state_payload()
        path = checkpoint_path(self.checkpoint_dir, self.step)
        if self.dist.is_main:
            save_checkpoint(path, payload)
            for _, old in list_checkpoints(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
        self.dist.barrier()
        return path

    def load(self, path: str) -> int:
        payload = load_checkpoint(path)
        if payload["algo"] != self.algo:
            raise CheckpointError(f"checkpoint {path} is from a {payload['algo']} run, not {self.algo}")
        saved, current = payload["config"], config_to_dict(self.config)
        changed = sorted(k for k in set(saved) | set(current)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise CheckpointError(f"checkpoint {path} was written with a different config ({diffs}); "
                                  f"resume with the same settings")
        try:
            self._load_model_state(self._scorer_module(), payload["policy"])
            self._load_strategy_state(payload["reference_strategy"])
            self._load_optimizer_state(payload["optimizer"])
            self._load_extra_state(payload["trainer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this model/trainer: {exc}") from exc
        restore_rng_state(payload["rng"])
        self.step = int(payload["step"])
        return self.step

    # -- the loop -----------------------------------------------------------------------------
    def train(self, steps: int, *, resume: Optional[str | bool] = None, progress: Optional[bool] = None) -> dict:
        """Run to ``steps`` optimizer steps in total (continuing a checkpoint with ``resume``)."""
        cfg = self.config
        if resume:
            if not self.checkpoint_dir and not isinstance(resume, str):
                raise CheckpointError("resume needs an output directory or a checkpoint path")
            self.load(resolve_resume_path(resume, self.checkpoint_dir or ""))
        if steps < self.step:
            raise CheckpointError(f"the checkpoint is at step {self.step}, past the {steps} steps asked for")
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if self.out_dir and self.dist.is_main else None
        log = MetricsLog(metrics_path, resume_step=self.step if resume else None)
        show = cfg.progress if progress is None else progress
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=self.step, file=sys.stderr, desc=f"pyalign {self.algo}",
                   disable=not (show and self.dist.is_main), dynamic_ncols=True, leave=False)
        last_record: dict = {}
        try:
            while self.step < steps:
                step = self.step + 1
                started = time.perf_counter()
                record = {"step": step}
                record.update(self.train_step(step))
                self.step = step
                if cfg.eval_every and step % cfg.eval_every == 0:
                    for key, value in self.evaluate(self._eval_prompts, step).items():
                        record["eval_" + key if key in record else key] = value
                elapsed = time.perf_counter() - started
                record["tokens_per_s"] = record.pop("_tokens", 0.0) / max(elapsed, 1e-9)
                record["step_time_s"] = elapsed
                log.write(record)
                last_record = record
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "gold_reward", "kl_to_init")
                                 if k in record})
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                    self.save()
        finally:
            bar.close()
        checkpoint = self.save()
        final = self.evaluate(self._final_prompts, "final")
        final_record = {"step": self.step, "final": True, **final}
        log.write(final_record)
        plot = None
        if metrics_path:
            plot = plot_reward_vs_kl(read_metrics(metrics_path), os.path.join(self.out_dir, "reward_vs_kl.png"),
                                     f"{self.algo}: gold reward vs KL to the initial model")
        return {"algo": self.algo, "steps": self.step, **final, "last_step": last_record,
                "checkpoint": checkpoint, "metrics": metrics_path, "plot": plot}


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _gather_shard(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``shard`` is this rank's part, laid out like ``param``."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return shard.detach().cpu()
    full = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()
    return full.detach().cpu()


def _local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, sharded like ``param`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the FSDP2 wrapping unit)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def format_summary(summary: dict) -> str:
    parts = [f"pyalign train: algo={summary['algo']} steps={summary['steps']}"]
    for key in ("gold_reward", "proxy_reward", "kl_to_init"):
        if key in summary:
            parts.append(f"{key}={summary[key]:.4f}")
    if summary.get("metrics"):
        parts.append(f"metrics={summary['metrics']}")
    if summary.get("plot"):
        parts.append(f"plot={summary['plot']}")
    if summary.get("checkpoint"):
        parts.append(f"checkpoint={summary['checkpoint']}")
    return " ".join(parts)


__all__ = ["TrainerConfig", "Trainer", "CheckpointError", "DistContext", "init_distributed",
           "ResponseScorer", "response_mask", "make_generator", "stable_seed", "save_checkpoint",
           "load_checkpoint", "list_checkpoints", "read_metrics", "plot_reward_vs_kl", "format_summary",
           "MetricsLog", "capture_rng_state", "restore_rng_state", "split_evenly", "micro_slices"]
