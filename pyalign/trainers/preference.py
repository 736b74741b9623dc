"""Offline preference optimisation: DPO and every pairwise loss of ``pyalign.preference_loss``
(IPO, SLiC/hinge, robust, ...), weighted combinations of them (MPO), their f-divergence, LD-DPO
and WPO options (``pyalign.token_preference_loss``), the reference-free SimPO, CPO and ORPO
(``reference="none"``: TRL's CPOTrainer and ORPOTrainer, which add ``cpo_alpha`` times the NLL of
the chosen responses, the registry's ``sft``), KTO and APO-zero on unpaired data
(``pyalign.kto_loss``), and their trust-region variants (TR-DPO/TR-IPO/TR-KTO: the reference is
pulled towards the policy every ``tr_tau`` steps by ``pyalign.refmodel.TrustRegion``) or a BEMA
reference (``reference="bema"``: ``pyalign.refmodel.BEMA``, the ``bema_*`` keys). With a
LoRA policy (``pyalign train --lora``) only the adapter trains and the trust-region reference is
a frozen copy of base and adapter whose adapter factors alone are lerped (docs/algorithms.md).

One optimizer step consumes ``batch_size`` examples (pairs, or unpaired examples for KTO) split
evenly over ranks and, on each rank, into micro-batches of ``micro_batch_size``. The summed
per-example loss of a rank is divided by its share of the batch, so DDP's gradient average is
the gradient of the global mean, whatever the number of ranks or micro-batches (except for the
batch-level losses aot, aot_unpaired and sft, which sort or token-average within a micro-batch,
as TRL's do under gradient accumulation).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

import torch

import pyalign
from pyalign import losses
from pyalign._bema import BEMASchedule
from pyalign.trainers.distributed import micro_slices, split_evenly
from pyalign.trainers.fields import Algorithm, check_applies, setting
from pyalign.trainers.scoring import masked_sum
from pyalign.trainers.seeding import make_generator
from pyalign.trainers.trainer import Trainer, TrainerConfig, frozen

# "none": a reference-free loss (the policy's log-probs against a reference of log-prob 0:
# SimPO/CPO/ORPO-style algorithms; the initial model is kept for the KL-to-init metric only)
REFERENCES = ("frozen", "trust_region", "bema", "none")
LOSS_KINDS = ("pairwise", "unpaired")
PAIRWISE, UNPAIRED, TRUST_REGION, FROZEN = (("loss_kind", ("pairwise",)), ("loss_kind", ("unpaired",)),
                                            ("reference", ("trust_region",)), ("reference", ("frozen",)))
BEMA = ("reference", ("bema",))
NO_REFERENCE = ("reference", ("none",))


@dataclasses.dataclass
class PreferenceConfig(TrainerConfig):
    loss: Union[str, list] = setting("sigmoid", "the loss: a pairwise loss of "
                                     "pyalign.preference_loss or a list of them (MPO), or an "
                                     "unpaired one (kto, apo_zero_unpaired); any loss of the "
                                     "algorithm's kind", aliases=("loss_type",), item_type=str)
    loss_weights: Optional[list] = setting(None, "one weight per loss of a list (default 1.0 each)",
                                           applies=PAIRWISE, item_type=float)
    beta: float = setting(0.1, "the strength of the KL regularisation (IPO: its tau)", bounds="> 0")
    label_smoothing: float = setting(0.0, "the probability a label is flipped (robust, EXO)",
                                     bounds="in [0, 0.5)")
    f_divergence: str = setting("reverse_kl", "the f-divergence of f-DPO", applies=PAIRWISE,
                                aliases=("f_divergence_type",))
    f_alpha_divergence_coef: float = setting(0.5, "alpha of the alpha-divergence", applies=PAIRWISE)
    simpo_gamma: float = setting(losses.SIMPO_GAMMA, "SimPO: the target reward margin gamma",
                                 applies=("loss", losses.SIMPO_GAMMA_LOSSES))
    cpo_alpha: float = setting(0.0, "reference-free losses: the weight of the NLL of the chosen "
                               "responses added to the loss (CPO: TRL's 1.0; SimPO: 0; ORPO: 1)",
                               bounds=">= 0", applies=NO_REFERENCE)
    ld_alpha: Optional[float] = setting(None, "LD-DPO: the weight of the tokens past the pair's "
                                        "shared length", applies=PAIRWISE)
    use_weighting: bool = setting(False, "WPO pair weights", applies=PAIRWISE)
    length_normalize: bool = setting(False, "average the log-probs over the response tokens "
                                     "(IPO does)")
    desirable_weight: float = setting(1.0, "KTO: the weight of the desirable examples",
                                      bounds="> 0", applies=UNPAIRED)
    undesirable_weight: float = setting(1.0, "KTO: the weight of the undesirable examples",
                                        bounds="> 0", applies=UNPAIRED)
    reference: str = setting("frozen", "the reference: frozen, trust_region (TR-DPO/IPO/KTO), bema "
                             "(a bias-corrected EMA of the policy, TRL's BEMACallback), or none (a "
                             "reference-free pairwise loss)", choices=REFERENCES)
    tr_alpha: float = setting(0.6, "trust region: the soft-update weight (1.0: the hard update)",
                              applies=TRUST_REGION, aliases=("ref_model_mixup_alpha",))
    tr_tau: int = setting(10, "trust region: optimizer steps between reference updates",
                          applies=TRUST_REGION, aliases=("ref_model_sync_steps",))
    # BEMA: TRL's BEMACallback settings and defaults (pyalign._bema.BEMASchedule)
    bema_update_freq: int = setting(400, "BEMA: optimizer steps between updates", applies=BEMA)
    bema_ema_power: float = setting(0.5, "BEMA: kappa, beta_t = (lag + multiplier t)^-ema_power",
                                    applies=BEMA)
    bema_bias_power: float = setting(0.2, "BEMA: eta, alpha_t = (lag + multiplier t)^-bias_power",
                                     applies=BEMA)
    bema_lag: float = setting(10.0, "BEMA: rho, the lag of the schedule", applies=BEMA)
    bema_update_after: int = setting(0, "BEMA: tau, the burn-in steps (the snapshot is taken there)",
                                     applies=BEMA)
    bema_multiplier: float = setting(1.0, "BEMA: gamma, the schedule's step multiplier", applies=BEMA)
    bema_min_ema_multiplier: float = setting(0.0, "BEMA: beta_t's floor", applies=BEMA)
    precompute_ref: bool = setting(True, "score the dataset with the frozen reference once up "
                                   "front", applies=FROZEN, aliases=("precompute_ref_log_probs",))
    num_examples: int = setting(1024, "the dataset's size (pairs, or unpaired examples for KTO); "
                                "epochs repeat it (with --data: its number of rows)", bounds=">= 1")

    @property
    def loss_kind(self) -> str:
        """'unpaired' for KTO's losses (unpaired examples), else 'pairwise'."""
        return "unpaired" if isinstance(self.loss, str) and self.loss in losses.UNPAIRED_NAMES \
            else "pairwise"

    def validate(self) -> None:
        super().validate()
        check_applies(self, ("loss_kind",))  # a pairwise option with KTO's losses, or the reverse
        if isinstance(self.loss, str) and self.loss not in losses.NAMES:
            raise ValueError(f"config key 'loss' must be one of {losses.NAMES} or a list of the pairwise "
                             f"ones, got {self.loss!r}")
        pyalign.refmodel.trust_region_settings(self.tr_alpha, self.tr_tau,
                                               keys=("config key 'tr_alpha'", "config key 'tr_tau'"))
        try:
            self.bema_schedule()
        except ValueError as exc:  # the schedule's message names its fields: name the config keys
            message = str(exc)
            for field in dataclasses.fields(BEMASchedule):
                message = re.sub(rf"\b{field.name}\b", f"bema_{field.name}", message)
            raise ValueError(f"config: {message}") from None
        if self.reference == "none" and (self.loss_kind == "unpaired" or self.ld_alpha is not None):
            raise ValueError("config key 'reference' = 'none' takes a pairwise loss without ld_alpha "
                             "(KTO's losses and LD-DPO's weights need a reference model)")
        if self.reference == "none" and self.cpo_alpha > 0 and "sft" in self._loss_names():
            raise ValueError("config key 'loss' holds sft, which cpo_alpha adds already with "
                             "reference = 'none': set cpo_alpha (the NLL's weight) instead")
        if self.num_examples < self.batch_size:
            raise ValueError(f"config key 'num_examples' must be >= batch_size ({self.batch_size}), "
                             f"got {self.num_examples!r}")
        if self.loss_kind == "pairwise":
            try:  # the op's own checks, each naming its argument (= the config key)
                pyalign.ops.preference.check_loss_options(
                    self.loss, self.loss_weights, beta=self.beta, label_smoothing=self.label_smoothing,
                    f_divergence=self.f_divergence,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                    simpo_gamma=self.simpo_gamma, ld_alpha=self.ld_alpha,
                    use_weighting=self.use_weighting, average_log_prob=self.length_normalize)
            except (TypeError, ValueError) as exc:  # length_normalize is the op's average_log_prob
                raise ValueError(f"config: {str(exc).replace('average_log_prob', 'length_normalize')}"
                                 ) from None

    def _loss_names(self) -> list:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    def loss_terms(self) -> tuple[Union[str, list], Optional[list]]:
        """(loss, loss_weights) of the op: with no reference, TRL's CPO/ORPO add cpo_alpha x the
        NLL of the chosen responses (the registry's sft) to the configured loss."""
        if self.reference != "none" or self.cpo_alpha == 0:
            return self.loss, self.loss_weights
        names = self._loss_names()
        weights = list(self.loss_weights) if self.loss_weights else [1.0] * len(names)
        return [*names, "sft"], [*weights, self.cpo_alpha]

    def bema_schedule(self) -> BEMASchedule:
        return BEMASchedule(**{field.name: getattr(self, f"bema_{field.name}")
                               for field in dataclasses.fields(BEMASchedule)})


class PreferenceTrainer(Trainer):
    """DPO-family and KTO training on the task's preference data; see PreferenceConfig."""

    algo = "dpo"
    family = "preference"
    config_class = PreferenceConfig
    config: PreferenceConfig

    # -- set-up -------------------------------------------------------------------------------
    def _make_reference(self) -> torch.nn.Module:
        if self.config.reference in ("trust_region", "bema"):
            # A moving reference: its own copy, so the KL-to-init metric keeps the initial model.
            return frozen(self.model_factory().to(self.dist.device))
        return self.init_model

    def _make_strategy(self):
        if self.config.reference == "trust_region":
            # With adapters on a frozen base (LoRA), the reference is a full frozen copy whose
            # adapter weights alone are lerped: the base weights of the two are equal forever.
            adapters_only = not all(p.requires_grad for p in self.policy.parameters())
            return pyalign.refmodel.TrustRegion(self.policy, self.ref_model, alpha=self.config.tr_alpha,
                                                tau=self.config.tr_tau, trainable_only=adapters_only,
                                                backend=self.config.backend)
        if self.config.reference == "bema":  # tracks the trainable parameters (the adapter)
            return pyalign.refmodel.BEMA(self.policy, self.ref_model,
                                         *dataclasses.astuple(self.config.bema_schedule()),
                                         backend=self.config.backend)
        return pyalign.refmodel.Frozen(self.ref_model)

    @property
    def is_kto(self) -> bool:
        """KTO's family: an unpaired loss (kto, apo_zero_unpaired) on unpaired examples."""
        return self.config.loss_kind == "unpaired"

    @property
    def uses_kl_reference(self) -> bool:
        """The loss needs KTO's reference point, estimated on mismatched pairs (kto, not apo)."""
        return self.is_kto and losses.get(self.config.loss, pairwise=False).uses_kl_reference

    def _build_data(self) -> None:
        cfg, task = self.config, self.task
        generator = make_generator(cfg.seed, "preference-data")
        if self.is_kto:
            data = task.unpaired(cfg.num_examples, generator)
            completions = data["completion"]
            self.data = {"prompt": data["prompt"], "completion": completions,
                         "desirable": data["desirable"].to(torch.bool)}
            self._response_keys = ("completion",)
            if self.uses_kl_reference:
                # KTO's KL reference point scores each prompt with its neighbour's completion
                # (row i with row i^1), a pairing fixed in the dataset so it can be precomputed.
                partner = torch.arange(cfg.num_examples) ^ 1
                partner[partner >= cfg.num_examples] = cfg.num_examples - 1
                self.data["mismatched"] = completions[partner]
                self._response_keys = ("completion", "mismatched")
        else:
            data = task.preference_pairs(cfg.num_examples, generator)
            self.data = {"prompt": data["prompt"], "chosen": data["chosen"], "rejected": data["rejected"]}
            self._response_keys = ("chosen", "rejected")
        self.ref_logps: Optional[dict] = None
        # LD-DPO scores the reference per token each step (the pair's shared length weighs it)
        if cfg.precompute_ref and cfg.reference == "frozen" and (self.is_kto or cfg.ld_alpha is None):
            self.ref_logps = self._score_dataset()

    @torch.no_grad()
    def _score_dataset(self) -> dict:
        """Reference sequence log-probs of every dataset response, in fixed chunks (the same
        numbers on every rank, in every run)."""
        cfg = self.config
        out = {key: torch.empty(cfg.num_examples, dtype=torch.float32) for key in self._response_keys}
        chunk = max(cfg.micro_batch_size, 1)
        for start in range(0, cfg.num_examples, chunk):
            rows = slice(start, min(start + chunk, cfg.num_examples))
            for key in self._response_keys:
                logps = self._ref_sequence_logps(self.data["prompt"][rows], self.data[key][rows])
                out[key][rows] = logps.cpu()
        return out

    def _ref_sequence_logps(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        prompts, responses = prompts.to(self.dist.device), responses.to(self.dist.device)
        mask = self.response_mask(responses)
        logprobs = self.ref_scorer(prompts, responses, mask)
        return pyalign.sequence_logprobs(logprobs, mask, average=self.config.length_normalize)

    # -- data order ---------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """Dataset rows of optimizer step ``step`` (1-based): consecutive slices of a per-epoch
        permutation, so the data position is a function of the step."""
        cfg = self.config
        first = (step - 1) * cfg.batch_size
        rows = []
        while len(rows) < cfg.batch_size:
            position = first + len(rows)
            epoch, offset = divmod(position, cfg.num_examples)
            perm = torch.randperm(cfg.num_examples, generator=make_generator(cfg.seed, "epoch", epoch))
            take = min(cfg.batch_size - len(rows), cfg.num_examples - offset)
            rows.extend(perm[offset:offset + take].tolist())
        return torch.tensor(rows, dtype=torch.int64)

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg = self.config
        local = split_evenly(cfg.batch_size, self.dist.world_size, "batch_size")
        rows = self.batch_indices(step)[self.dist.rank * local:(self.dist.rank + 1) * local]
        slices = micro_slices(local, cfg.micro_batch_size)
        sums: dict[str, float] = {}
        if self.is_kto:
            kl_estimates = self._kto_kl_estimates(rows, slices) if self.uses_kl_reference else None
        for i, part in enumerate(slices):
            with self._accumulating(last=i == len(slices) - 1):
                if self.is_kto:
                    values = self._kto_micro_step(rows[part], local, kl_estimates)
                else:
                    values = self._pairwise_micro_step(rows[part], local)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
        grad_norm = self._optimizer_step(step)
        reference_updated = bool(self.ref_strategy.step(step, self.optimizer))
        if self.is_kto:
            counts = dict(loss="n", desirable_reward="n_desirable", undesirable_reward="n_undesirable",
                          entropy="tokens", kto_kl="micro_batches")
        else:
            counts = dict(loss="n", chosen_reward="n", rejected_reward="n", margin="n",
                          accuracy="n", entropy="tokens")
        record = self._reduce_means(sums, counts)
        tokens = self.dist.all_reduce_sum(torch.tensor([sums["all_tokens"]], dtype=torch.float64))
        record.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                      reference_updated=reference_updated, _tokens=float(tokens))
        return record

    def _batch(self, rows: torch.Tensor, key: str) -> torch.Tensor:
        return self.data[key][rows].to(self.dist.device)

    def _reference(self, rows: torch.Tensor, key: str) -> torch.Tensor:
        if self.config.reference == "none":  # a reference-free loss: log-ratios are the log-probs
            return torch.zeros(rows.shape[0], device=self.dist.device)
        if self.ref_logps is not None:
            return self.ref_logps[key][rows].to(self.dist.device)
        with torch.no_grad():
            return self._ref_sequence_logps(self.data["prompt"][rows], self.data[key][rows])

    def _pairwise_micro_step(self, rows: torch.Tensor, local: int) -> dict:
        cfg = self.config
        prompts = self._batch(rows, "prompt")
        responses = torch.cat([self._batch(rows, "chosen"), self._batch(rows, "rejected")])
        mask = self.response_mask(responses)
        both_prompts = torch.cat([prompts, prompts])
        # chosen and rejected in one forward (chosen rows first)
        scored = self.scorer(both_prompts, responses, mask, entropy=True,
                             log_sum_sq=cfg.use_weighting)
        logprobs, entropy = scored[:2]
        if cfg.ld_alpha is not None:  # LD-DPO weighs the reference's tokens by the pair too
            with torch.no_grad():
                reference = self.ref_scorer(both_prompts, responses, mask)
        else:
            reference = torch.cat([self._reference(rows, "chosen"), self._reference(rows, "rejected")])
        pairs = rows.shape[0]
        loss, loss_weights = cfg.loss_terms()
        out = pyalign.token_preference_loss(
            logprobs, reference, mask, loss=loss, loss_weights=loss_weights, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, f_divergence=cfg.f_divergence,
            f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, simpo_gamma=cfg.simpo_gamma,
            ld_alpha=cfg.ld_alpha,
            use_weighting=cfg.use_weighting, log_sum_sq_probs=scored[2] if cfg.use_weighting else None,
            average_log_prob=cfg.length_normalize, reduction="sum", backend=cfg.backend)
        (out.loss / local).backward()
        return {"loss": float(out.loss.detach()), "n": pairs,
                "chosen_reward": float(out.chosen_rewards.sum()),
                "rejected_reward": float(out.rejected_rewards.sum()),
                "margin": float(out.margins.sum()), "accuracy": float((out.margins > 0).sum()),
                "entropy": masked_sum(entropy, mask), "tokens": float(mask.sum()),
                "all_tokens": float(2 * pairs * (prompts.shape[1] + responses.shape[1]))}

    @torch.no_grad()
    def _kto_kl_estimates(self, rows: torch.Tensor, slices: list) -> torch.Tensor:
        """This rank's KL estimates for KTO's reference point: log policy/ref of each mismatched
        prompt-completion pair of its share of the batch (every micro-batch), detached. Every
        micro-batch's kto_loss gets all of them and averages them over the ranks, so z0 is the
        mean over the whole global batch and the loss does not depend on how it is split."""
        estimates = []
        for part in slices:
            batch = rows[part]
            prompts, mismatched = self._batch(batch, "prompt"), self._batch(batch, "mismatched")
            mask = self.response_mask(mismatched)
            policy = pyalign.sequence_logprobs(self._scorer_module()(prompts, mismatched, mask), mask,
                                               average=self.config.length_normalize)
            estimates.append(policy - self._reference(batch, "mismatched"))
        return torch.cat(estimates)

    def _kto_micro_step(self, rows: torch.Tensor, local: int, kl_estimates: Optional[torch.Tensor]) -> dict:
        cfg = self.config
        prompts = self._batch(rows, "prompt")
        completions = self._batch(rows, "completion")
        desirable = self._batch(rows, "desirable")
        mask = self.response_mask(completions)
        logprobs, entropy = self.scorer(prompts, completions, mask, entropy=True)
        sequence = pyalign.sequence_logprobs(logprobs, mask, average=cfg.length_normalize)
        out = pyalign.kto_loss(sequence, self._reference(rows, "completion"), desirable, kl_estimates,
                               loss=cfg.loss, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                               undesirable_weight=cfg.undesirable_weight, reduction="sum")
        (out.loss / local).backward()
        n = rows.shape[0]
        # z0 is the same in every micro-batch of every rank: its mean over them is z0
        kl = {"kto_kl": float(out.kl), "micro_batches": 1.0} if self.uses_kl_reference else {}
        return {**kl, "loss": float(out.loss.detach()), "n": n,
                "desirable_reward": float(out.rewards[desirable].sum()),
                "n_desirable": float(desirable.sum()),
                "undesirable_reward": float(out.rewards[~desirable].sum()),
                "n_undesirable": float((~desirable).sum()),
                "entropy": masked_sum(entropy, mask), "tokens": float(mask.sum()),
                "all_tokens": float(2 * n * (prompts.shape[1] + completions.shape[1]))}


# --algo presets. The embedded task's tuned values run about a minute on 2 CPU cores; on one's
# own model (--model) the defaults are TRL 1.16's DPOConfig (and KTOConfig, the same numbers):
# learning_rate 1e-6, per_device_train_batch_size 8, gradient_accumulation_steps 1,
# num_train_epochs 3, lr_scheduler_type "linear", warmup 0, max_grad_norm 1.0, beta 0.1,
# max_length 1024, no evaluation; the trust region's ref_model_mixup_alpha 0.6 and
# ref_model_sync_steps 512.
EMBEDDED_STEPS = 100
TRL_DEFAULTS = dict(lr=1e-6, per_device_batch_size=8, gradient_accumulation_steps=1, num_epochs=3.0,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    beta=0.1, max_length=1024, eval_every=0, final_eval_batch_size=0)
TRL_TRUST_REGION = dict(tr_alpha=0.6, tr_tau=512)
# The embedded task's values of the reference-free algorithms: their preference terms work on
# per-token means (SimPO, ORPO) or beside the NLL of the chosen responses (CPO, ORPO), and need a
# larger beta than DPO's there (100 steps, gold reward: SimPO 0.18 at beta 2, CPO 0.12 at 0.5 and
# 0.07 at 0.1, ORPO 0.15 at 10 and 0.02 at 0.1; DPO 0.15; one seed each)
SIMPO_TUNED = dict(beta=2.0, simpo_gamma=0.5)
CPO_TUNED = dict(beta=0.5)
ORPO_TUNED = dict(beta=10.0)


def _algorithm(name: str, summary: str, loss: str, *, reference: str = "frozen",
               length_normalize: bool = False, fixed: Optional[dict] = None,
               defaults: Optional[dict] = None, tuned: Optional[dict] = None,
               trl: Optional[dict] = None) -> Algorithm:
    """A preference algorithm: its loss (any other of the same kind may replace it), its
    reference (frozen, trust_region, none) and whether it averages the log-probs over the
    response; ``fixed`` and ``defaults`` its other settings (fixed, or starting values),
    ``tuned`` and ``trl`` its own values over the family's. A frozen reference is a default that
    ``--reference bema`` may change (TRL's BEMACallback on a DPO run; a trust region is the tr-
    algorithm's); the trust-region and reference-free algorithms fix theirs."""
    trl_values = {**TRL_DEFAULTS, **(TRL_TRUST_REGION if reference == "trust_region" else {})}
    moving = reference != "frozen"
    return Algorithm(name, PreferenceTrainer, summary,
                     fixed={"length_normalize": length_normalize,
                            **({"reference": reference} if moving else {}), **(fixed or {})},
                     defaults={"loss": loss, **({} if moving else {"reference": reference}),
                               **(defaults or {})},
                     choices={} if moving else {"reference": ("frozen", "bema")},
                     tuned={"steps": EMBEDDED_STEPS, **(tuned or {})},
                     trl={**trl_values, **(trl or {})})


# The reference-free algorithms are TRL's CPOConfig (loss_type "sigmoid": CPO; "simpo" with
# cpo_alpha 0: SimPO, as TRL's documentation sets it; with cpo_alpha > 0: CPO-SimPO) and
# ORPOConfig (beta is ORPO's lambda; the NLL's weight is 1, fixed): their defaults are the
# DPOConfig numbers above (learning_rate 1e-6, beta 0.1; simpo_gamma 0.5, cpo_alpha 1.0).
ALGORITHMS = (
    _algorithm("dpo", "DPO: the sigmoid loss on the implicit reward margin", "sigmoid"),
    _algorithm("ipo", "IPO: the squared loss on the length-normalised margin", "ipo",
               length_normalize=True, tuned={"beta": 0.5}),
    _algorithm("slic", "SLiC: the hinge loss on the margin", "hinge"),
    _algorithm("kto", "KTO on desirable / undesirable examples (a pair gives one of each)", "kto"),
    _algorithm("tr-dpo", "TR-DPO: DPO with a trust-region reference", "sigmoid",
               reference="trust_region"),
    _algorithm("tr-ipo", "TR-IPO: IPO with a trust-region reference", "ipo",
               reference="trust_region", length_normalize=True, tuned={"beta": 0.5}),
    _algorithm("tr-kto", "TR-KTO: KTO with a trust-region reference", "kto", reference="trust_region"),
    _algorithm("simpo", "SimPO: the sigmoid loss on the length-averaged log-prob margin minus "
               "gamma, no reference (--cpo-alpha > 0: CPO-SimPO)", "simpo", reference="none",
               length_normalize=True, tuned=SIMPO_TUNED),
    _algorithm("cpo", "CPO: the sigmoid loss on the log-prob margin, no reference, plus "
               "cpo_alpha x the NLL of the chosen responses", "cpo", reference="none",
               defaults={"cpo_alpha": 1.0}, tuned=CPO_TUNED),
    _algorithm("orpo", "ORPO: the odds-ratio loss (beta = lambda) on the length-averaged "
               "log-probs plus the NLL of the chosen responses", "orpo", reference="none",
               length_normalize=True, fixed={"cpo_alpha": 1.0}, tuned=ORPO_TUNED),
)
