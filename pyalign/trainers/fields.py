"""How a run setting is declared, once, and what is derived from the declaration.

A setting is a dataclass field made with ``setting``; its metadata carries the help text, the
accepted values and the setting's other names::

    lr: float = setting(1e-3, "AdamW's learning rate", bounds="> 0", aliases=("learning_rate",))

From these fields ``pyalign train`` derives its flags (``--lr``, and ``--learning-rate`` for
each alias: TRL's names), the keys a config file may hold, ``--print-config`` and the checks:

- ``bounds``: ``"> 0"``, ``">= 1"``, ``"in [0, 0.5)"``, ``"in (0, 1]"``...; ``check_fields``
  refuses a value outside them with "config key 'lr' must be > 0, got -1.0" (an int field's
  ``">= n"`` through ``pyalign._utils.check_int``);
- ``choices``: the accepted values;
- ``applies``: ``(attribute, values)``: the setting means something only when the config's
  ``attribute`` (a field or a property) is one of ``values``, e.g. ``tr_alpha`` only with
  ``reference = "trust_region"``. ``pyalign train`` refuses it elsewhere, naming the algorithms
  it is for (derived from their presets); ``check_applies`` refuses it in a config;
- ``flag``: False for a field no flag or config key sets (internal or derived values).

``Algorithm`` is one entry of ``pyalign train --algo``: its trainer (whose ``config_class`` is
its config) and the values it fixes; each family declares its algorithms next to its trainer
(``pyalign/trainers/preference.py``, ``rl.py``) and ``presets.ALGOS`` collects them.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Optional

from pyalign._utils import check_int


def setting(default: Any = None, help: str = "", *, aliases: tuple = (), bounds: Optional[str] = None,
            choices: Optional[tuple] = None, applies: Optional[tuple] = None, flag: bool = True,
            item_type: Optional[type] = None, default_factory=None):
    """A dataclass field declaring one run setting (see the module docstring). ``item_type``:
    the type of a list setting's items on the command line."""
    metadata = {"help": help, "aliases": tuple(aliases), "bounds": bounds, "choices": choices,
                "applies": applies, "flag": flag, "item_type": item_type}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_types(config_cls) -> dict[str, Any]:
    """name -> declared type of every field of a dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def declared(config_cls) -> dict[str, dataclasses.Field]:
    """name -> field of the settings of ``config_cls`` that a flag or config key may set."""
    return {f.name: f for f in dataclasses.fields(config_cls) if f.metadata.get("flag", True)}


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def as_field_type(value, expected) -> tuple[bool, Any]:
    """``(True, value)`` when ``value`` fits a field declared ``expected`` (an int for a float
    field becomes a float), else ``(False, what the field must be)``. ``Optional[X]`` admits
    None; bool is never an int; a float must be finite."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        if value is None:
            return True, None
        members = [t for t in typing.get_args(expected) if t is not type(None)]
        if len(members) > 1:  # e.g. Union[str, list]: the first member the value fits
            results = [as_field_type(value, member) for member in members]
            fits = [result for result in results if result[0]]
            return fits[0] if fits else (False, " or ".join(what for _, what in results))
        expected = members[0]
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, "float (a finite number)"
    if expected is int:
        return (True, value) if isinstance(value, int) and not isinstance(value, bool) else (False, "int")
    return (True, value) if isinstance(value, expected) else (False, expected.__name__)


_INTERVAL = re.compile(r"^in ([\[(])(\S+), (\S+)([\])])$")


def within(value, bounds: str) -> bool:
    """Whether ``value`` lies within ``bounds`` ("> 0", ">= 1", "in [0, 1)", ...)."""
    interval = _INTERVAL.match(bounds)
    if interval:
        opening, low, high, closing = interval.groups()
        low_ok = value >= float(low) if opening == "[" else value > float(low)
        high_ok = value <= float(high) if closing == "]" else value < float(high)
        return low_ok and high_ok
    operator, _, limit = bounds.partition(" ")
    if operator == ">":
        return value > float(limit)
    if operator == ">=":
        return value >= float(limit)
    raise ValueError(f"unknown bounds {bounds!r}")


def check_value(key: str, field: dataclasses.Field, value) -> None:
    """``value`` is within the field's bounds and choices (None passes: an unset Optional)."""
    if value is None:
        return
    bounds, choices = field.metadata.get("bounds"), field.metadata.get("choices")
    if bounds and isinstance(value, int) and not isinstance(value, bool) and bounds.startswith(">= "):
        check_int(key, value, minimum=int(bounds[3:]), what=f"an int {bounds}", error=ValueError)
    elif bounds and isinstance(value, (int, float)) and not within(value, bounds):
        raise ValueError(f"{key} must be {bounds}, got {value!r}")
    if choices is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, got {item!r}")


def check_fields(config) -> None:
    """Every field of a config dataclass has its declared type, bounds and choices."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        ok, what = as_field_type(value, hints[field.name])
        if not ok:
            raise ValueError(f"config key {field.name!r} must be {what}, got {value!r}")
        check_value(f"config key {field.name!r}", field, value)


def condition_text(applies: tuple) -> str:
    attribute, values = applies
    return " or ".join(f"{attribute} = {value!r}" for value in values)


def applies_to(config, field: dataclasses.Field) -> bool:
    """Whether the setting ``field`` means something in ``config`` (its ``applies`` condition)."""
    applies = field.metadata.get("applies")
    return applies is None or getattr(config, applies[0]) in applies[1]


def check_applies(config, attributes: tuple) -> None:
    """A setting whose ``applies`` condition on one of ``attributes`` does not hold keeps its
    default (where setting it anyway would be a silent no-op the caller should hear about)."""
    for field in dataclasses.fields(config):
        applies = field.metadata.get("applies")
        if applies and applies[0] in attributes and not applies_to(config, field) \
                and getattr(config, field.name) != field_default(field):
            raise ValueError(f"config key {field.name!r} applies only when "
                             f"{condition_text(field.metadata['applies'])}, not here")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One ``pyalign train --algo``: its trainer class (whose ``config_class`` is its config),
    the config values it fixes (no config may change them), the values it starts from (a config
    may change them: a preference algorithm's loss, within its kind), and the defaults of each
    kind of run: ``tuned`` on the embedded task, ``trl`` on one's own model (``--model``), TRL
    1.16's defaults for the algorithm. Values of run settings (``steps``, ``num_epochs``,
    ``max_length``...) may appear in the last two. ``choices`` narrows a setting the algorithm
    leaves open (DPO's reference: frozen or bema, its trust-region variant being tr-dpo)."""

    name: str
    trainer: type
    summary: str
    fixed: dict
    defaults: dict = dataclasses.field(default_factory=dict)
    # settings the algorithm narrows to fewer values than their field accepts: {name: values}
    choices: dict = dataclasses.field(default_factory=dict)
    tuned: dict = dataclasses.field(default_factory=dict)
    trl: dict = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.trainer.family

    @property
    def config_class(self) -> type:
        return self.trainer.config_class

    def preset_config(self):
        """The config of the algorithm's fixed and starting values (the class defaults else)."""
        return self.config_class(**self.fixed, **self.defaults)

    def run_defaults(self, own_model: bool) -> dict:
        """The starting values of a run: the algorithm's, then its embedded or TRL defaults."""
        return {**self.defaults, **(self.trl if own_model else self.tuned)}


__all__ = ["setting", "field_types", "declared", "field_default", "as_field_type", "within",
           "check_value", "check_fields", "condition_text", "applies_to", "check_applies",
           "Algorithm"]
