"""The study grid: which runs a KL-budget study makes, checked before any of them starts.

A grid is algorithms x one strength knob per algorithm (swept over a list of values) x seeds,
and optionally x model sizes (``sizes``: names of pyalign.tasks.MODEL_SIZES, the SFT model at
each; without it every point trains the model the [task] table describes).
Every point is one ``pyalign train`` run (same keys, same validation) evaluated at fractions of
an epoch (``epochs``); the knobs an algorithm may sweep are ``STRENGTH_KNOBS``: beta for the
direct alignment algorithms, tr_alpha / tr_tau for the trust-region ones, kl_coef for RLOO
and GRPO, er_reset_every / er_ema_decay (or kl_coef) for Elastic Reset.

An epoch is ``num_examples / batch_size`` optimizer steps for the preference algorithms (one pass
over the preference data) and ``epoch_prompts / batch_size`` steps for RL (the same number of
prompts, seen online). Evaluations happen at the first step at or past each fraction.

Grid file (TOML), every table optional but ``[algos]``::

    seeds = [0, 1, 2, 3, 4]
    epochs = [0.125, 0.25, 0.5, 1, 2]
    sizes = ["small", "base", "large"]   # optional: the model-size ladder
    [algos.dpo]
    beta = [0.05, 0.1, 0.2, 0.4]         # a list: the swept knob
    [algos.tr-dpo]
    tr_tau = [4, 8, 16, 32]
    beta = 0.1                           # a scalar: a fixed setting of that algorithm
    [preference]                         # fixed settings of every preference point (lr, ...)
    [rl]                                 # ... of every RL point
    [task]                               # pyalign.tasks.TaskConfig fields (variable_length, ...)
    [eval]                               # prompts, heldout (sizes of each evaluation)

The tables hold any ``pyalign train`` setting (lr, max_length, per_device_batch_size, ...) but
those the study sets itself (``STUDY_SET``); ``num_epochs`` there is the run's length in epochs
(the evaluations: the grid's epochs below it, and it). On one's own model the grid also holds
``model``, ``data`` and the other keys of pyalign/study/userdata.py (``pyalign study --model DIR
--data FILE`` sets them), and no [task], sizes, task_seed or epoch_prompts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

from pyalign.trainers.presets import ALGOS

STRENGTH_KNOBS = {
    "dpo": ("beta",), "ipo": ("beta",), "slic": ("beta",), "kto": ("beta",),
    "simpo": ("beta",), "cpo": ("beta",), "orpo": ("beta",),
    "tr-dpo": ("tr_alpha", "tr_tau"), "tr-ipo": ("tr_alpha", "tr_tau"), "tr-kto": ("tr_alpha", "tr_tau"),
    "rloo": ("kl_coef",), "grpo": ("kl_coef",),
    "elastic-reset": ("er_reset_every", "er_ema_decay", "kl_coef"),
}
GRID_KEYS = ("name", "seeds", "epochs", "sizes", "algos", "preference", "rl", "task", "eval",
             "task_seed", "epoch_prompts", "budgets")
EVAL_DEFAULTS = {"prompts": 256, "heldout": 128}
# Study points set these: no per-step evaluation (the study evaluates at its own steps), no
# periodic checkpoints and a one-prompt final evaluation (the study's evaluations replace both).
RUN_OVERRIDES = {"eval_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0.0,
                 "final_eval_batch_size": 1, "progress": False}
USER_RUN_OVERRIDES = {**RUN_OVERRIDES, "final_eval_batch_size": 0}  # one's own model: none at all
# Run settings a study sets for each point: a grid's tables may not (on one's own model, nor
# 'reward': the grid's own key, --reward).
STUDY_SET = ("algo", "steps", "max_steps", "seed", "out", "output_dir", "model", "data", "eval_data",
             "task", "study", *RUN_OVERRIDES)


class GridError(ValueError):
    """A study grid that cannot run; raised before any point starts."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the grid: an algorithm at one knob value, one seed (and one model size)."""

    algo: str
    knob: str
    value: float
    seed: int
    settings: dict  # the trainer keys of the run (fixed settings + the knob), as a config file has them
    steps: int  # total optimizer steps (the last evaluation)
    eval_steps: tuple  # optimizer steps after which the point is evaluated (0: the initial model)
    epochs: tuple  # the epoch fraction of each evaluation step
    size: Optional[str] = None  # a name of pyalign.tasks.MODEL_SIZES, where the grid sweeps sizes

    @property
    def method(self) -> str:
        """The name the point is compared under: the algorithm, except RLOO without a KL
        penalty, which is its own baseline."""
        if self.algo == "rloo" and self.knob == "kl_coef" and self.value == 0:
            return "rloo (no KL)"
        return self.algo

    @property
    def point_id(self) -> str:
        size = f"__size={self.size}" if self.size else ""
        return f"{self.algo}__{self.knob}={id_value(self.value)}{size}__seed{self.seed}"


def format_value(value) -> str:
    """A knob value for people (``:g``: 0.10000001 shows as 0.1)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def id_value(value) -> str:
    """A knob value in a point id: ``:g`` where that reads back as the same float, else the
    shortest text that does (``repr``), so two values of a sweep never share an id."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


@dataclasses.dataclass
class Grid:
    """A validated grid (``parse_grid``); ``points()`` lists its runs."""

    spec: dict  # the normalised grid (what study.json stores)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def points(self) -> list[Point]:
        return expand(self.spec)


def _check_number_list(where: str, values, kind) -> list:
    if not isinstance(values, list) or not values:
        raise GridError(f"{where} must be a non-empty list, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind) or \
                (isinstance(v, float) and not math.isfinite(v)):
            raise GridError(f"{where} must hold {getattr(kind, '__name__', 'numbers')}, got {v!r}")
    return values


def parse_grid(raw: dict, name: str = "custom") -> Grid:
    """Check a grid mapping (a parsed grid file or a preset) and every point's trainer config;
    raise GridError naming what is wrong. Nothing runs here."""
    if not isinstance(raw, dict):
        raise GridError("a grid is a mapping of keys (seeds, epochs, algos, ...)")
    from pyalign.study import userdata
    valid = (*GRID_KEYS, *userdata.USER_KEYS)
    unknown = sorted(set(raw) - set(valid) - {"data_split"})
    if unknown:
        raise GridError(f"unknown grid key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    spec = copy.deepcopy(raw)
    spec.setdefault("name", name)
    user = userdata.is_user(spec)
    if user:
        userdata.check_user_keys(spec)
    else:
        userdata.check_embedded(spec)
    spec["seeds"] = _check_number_list("grid key 'seeds'", spec.get("seeds", [0, 1]), int)
    if any(s < 0 for s in spec["seeds"]) or len(set(spec["seeds"])) != len(spec["seeds"]):
        raise GridError(f"grid key 'seeds' must be distinct ints >= 0, got {spec['seeds']!r}")
    epochs = _check_number_list("grid key 'epochs'", spec.get("epochs", [0.125, 0.25, 0.5, 1, 2]),
                                (int, float))
    if any(e <= 0 for e in epochs) or sorted(set(epochs)) != list(epochs):
        raise GridError(f"grid key 'epochs' must be increasing fractions > 0, got {epochs!r}")
    spec["epochs"] = [float(e) for e in epochs]
    for table in ("preference", "rl", "task", "eval"):
        spec.setdefault(table, {})
        if not isinstance(spec[table], dict):
            raise GridError(f"grid key {table!r} must be a table of settings, got {spec[table]!r}")
    for table in ("preference", "rl", *(f"algos.{a}" for a in spec.get("algos") or {})):
        knobs = spec[table] if "." not in table else spec["algos"][table[6:]]
        study_set = {*STUDY_SET, *(("reward",) if user else ())}
        reserved = sorted(set(knobs) & study_set) if isinstance(knobs, dict) else []
        if reserved:
            raise GridError(f"[{table}] sets {', '.join(map(repr, reserved))}, which the study sets for "
                            f"each point (the steps from the grid's epochs, the seed from its seeds)")
    bad_eval = sorted(set(spec["eval"]) - set(EVAL_DEFAULTS))
    if bad_eval:
        raise GridError(f"unknown [eval] key(s) {bad_eval}; valid: {', '.join(EVAL_DEFAULTS)}")
    spec["eval"] = {**EVAL_DEFAULTS, **spec["eval"]}
    for key, value in spec["eval"].items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GridError(f"[eval] key {key!r} must be an int >= 1, got {value!r}")
    for key in ("task_seed", "epoch_prompts"):
        if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 0):
            raise GridError(f"grid key {key!r} must be an int >= 0, got {spec[key]!r}")
    if not user:
        spec.setdefault("task_seed", 0)
        spec.setdefault("epoch_prompts", 1024)
    if spec.get("epoch_prompts", 1) < 1:
        raise GridError("grid key 'epoch_prompts' must be >= 1")
    if "budgets" in spec:
        budgets = _check_number_list("grid key 'budgets'", spec["budgets"], (int, float))
        if any(b <= 0 for b in budgets):
            raise GridError(f"grid key 'budgets' must be KL budgets > 0, got {budgets!r}")
    algos = spec.get("algos")
    if not isinstance(algos, dict) or not algos:
        raise GridError("grid key 'algos' must name at least one algorithm, e.g. "
                        "[algos.dpo] beta = [0.1, 0.2]")
    for algo, knobs in algos.items():
        if algo not in ALGOS:
            raise GridError(f"unknown algorithm {algo!r} in the grid; choose from {', '.join(ALGOS)}")
        if not isinstance(knobs, dict):
            raise GridError(f"[algos.{algo}] must be a table: the swept knob = [values], fixed keys = value")
        swept = [k for k, v in knobs.items() if isinstance(v, list)]
        allowed = STRENGTH_KNOBS.get(algo)
        if allowed is None:  # an algorithm added to the presets without a study knob
            raise GridError(f"algorithm {algo!r} has no strength knob declared for studies "
                            f"(pyalign/study/grid.py STRENGTH_KNOBS)")
        if len(swept) != 1:
            raise GridError(f"[algos.{algo}] must sweep exactly one knob (a list of values) out of "
                            f"{', '.join(allowed)}; it sweeps {swept or 'none'}")
        knob = swept[0]
        if knob not in allowed:
            raise GridError(f"[algos.{algo}]: {knob!r} is not a strength knob of {algo}; "
                            f"{algo} sweeps one of {', '.join(allowed)}")
        values = knobs[knob]
        if not values:
            raise GridError(f"[algos.{algo}]: the sweep of {knob!r} is empty; give at least one value")
        _check_number_list(f"[algos.{algo}] {knob}", values, (int, float))
        if len(set(values)) != len(values):
            raise GridError(f"[algos.{algo}] {knob}: values repeat: {values!r}")
    _check_sizes(spec)
    grid = Grid(spec)
    points = grid.points()
    ids = [p.point_id for p in points]
    if len(set(ids)) != len(ids):  # a guard: id_value and the checks above make ids distinct
        raise GridError(f"two points of the grid share an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    for point in points[:: len(spec["seeds"])]:  # the seed changes no key's validity
        check_point(point, spec)
    return grid


def _check_sizes(spec: dict) -> None:
    from pyalign.tasks import MODEL_SIZES
    if "sizes" not in spec:
        return
    sizes = spec["sizes"]
    if not isinstance(sizes, list) or not sizes or any(s not in MODEL_SIZES for s in sizes) \
            or len(set(sizes)) != len(sizes):
        raise GridError(f"grid key 'sizes' must be distinct names of model sizes "
                        f"({', '.join(MODEL_SIZES)}), got {sizes!r}")
    fixed = sorted(set(spec["task"]) & set(MODEL_SIZES[sizes[0]]))
    if fixed:
        raise GridError(f"grid key 'sizes' sets the model's {', '.join(fixed)}: the [task] table "
                        f"cannot set them too")


def steps_per_epoch(algo: str, spec: dict, settings: dict) -> int:
    """Optimizer steps per epoch of the point's data (the embedded task's, or one's own)."""
    from pyalign.study import userdata
    if userdata.is_user(spec):
        return userdata.steps_per_epoch(algo, spec, settings)
    from pyalign.trainers import PreferenceConfig, RLConfig
    family = ALGOS[algo].family
    config_cls = PreferenceConfig if family == "preference" else RLConfig
    defaults = config_cls()
    batch = settings.get("batch_size", defaults.batch_size)
    if family == "preference":
        examples = settings.get("num_examples", defaults.num_examples)
    else:
        examples = spec["epoch_prompts"]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise GridError(f"{algo}: batch_size must be an int >= 1, got {batch!r}")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise GridError(f"{algo}: num_examples / epoch_prompts must be an int >= 1, got {examples!r}")
    return max(1, math.ceil(examples / batch))


def expand(spec: dict) -> list[Point]:
    points = []
    for algo, knobs in spec["algos"].items():
        family = ALGOS[algo].family
        (knob,) = [k for k, v in knobs.items() if isinstance(v, list)]
        fixed = {**spec[family], **{k: v for k, v in knobs.items() if k != knob}}
        for value in knobs[knob]:
            settings = {**fixed, knob: value}
            length = settings.pop("num_epochs", None)  # the run's length: the last evaluation
            fractions = spec["epochs"] if length is None else \
                [e for e in spec["epochs"] if e < length] + [float(length)]
            per_epoch = steps_per_epoch(algo, spec, settings)
            steps = [0] + [max(1, math.ceil(e * per_epoch)) for e in fractions]
            eval_steps = tuple(sorted(set(steps)))
            epochs = tuple(s / per_epoch for s in eval_steps)
            for size in spec.get("sizes", [None]):
                for seed in spec["seeds"]:
                    points.append(Point(algo=algo, knob=knob, value=value, seed=seed,
                                        settings=settings, steps=eval_steps[-1],
                                        eval_steps=eval_steps, epochs=epochs, size=size))
    return points


def task_settings(point: Point, spec: dict) -> dict:
    """The TaskConfig fields of a point: the grid's [task] table and its model size."""
    from pyalign.tasks import MODEL_SIZES
    return {**spec["task"], **(MODEL_SIZES[point.size] if point.size else {})}


def train_config(point: Point, spec: dict, out: str, files: Optional[dict] = None) -> dict:
    """The ``pyalign train`` config file of a point (flat keys, a [task] and a [study] table);
    on one's own model ``files``: its ``data`` and ``eval_data`` (userdata.point_files; default
    --data and --eval-data themselves)."""
    study = {"point_id": point.point_id, "method": point.method, "knob": point.knob,
             "value": point.value, "eval_steps": list(point.eval_steps),
             "epochs": list(point.epochs), **spec["eval"],
             **({"size": point.size} if point.size else {})}
    head = {"algo": point.algo, "steps": point.steps, "seed": point.seed, "out": out}
    if not spec.get("data"):
        return {**head, "task_seed": spec["task_seed"], **point.settings, **RUN_OVERRIDES,
                "task": task_settings(point, spec), "study": study}
    files = files or {"data": spec["data"], "eval_data": spec.get("eval_data")}
    rl = ALGOS[point.algo].family == "rl"
    gold = {"gold_reward": spec["gold_reward"]} if spec.get("gold_reward") else {}
    return {**head, "model": spec["model"], **files, **({"reward": spec.get("reward")} if rl else {}),
            **point.settings, **USER_RUN_OVERRIDES, "study": {**study, **gold}}


def check_point(point: Point, spec: dict) -> None:
    """Resolve the point's config exactly as ``pyalign train`` would; a bad key is a GridError."""
    from pyalign.data import DataError
    from pyalign.trainers.resolve import resolve_config_values
    from pyalign.trainers.settings import ConfigError
    values = train_config(point, spec, out="unused")
    values.pop("study")
    values.pop("eval_data", None)  # the held-out data: read by check_inputs, not the settings
    try:
        resolve_config_values(values, where=f"grid point {point.point_id}")
    except (ConfigError, DataError) as exc:
        raise GridError(str(exc)) from exc


__all__ = ["Grid", "GridError", "Point", "STRENGTH_KNOBS", "parse_grid", "train_config", "task_settings",
           "format_value", "id_value"]
