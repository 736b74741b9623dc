"""The training algorithms by name (``pyalign train --algo``), collected from their families:
each is declared next to its trainer and config class (``ALGORITHMS`` at the end of
``pyalign/trainers/preference.py`` and ``rl.py``) as a ``fields.Algorithm``: its trainer, the
config values it fixes, the values it starts from, its tuned defaults on the embedded task and
TRL 1.16's defaults on one's own model.

Which config keys apply to which algorithm is derived, never listed: a key an algorithm fixes
cannot be set; a key whose field declares ``applies`` (``tr_alpha``: with a trust-region
reference, ``er_*``: with Elastic Reset, ...) is for the algorithms whose preset config meets
the condition (``algorithms_for``); every other field of the family's config applies to every
algorithm of the family. Adding an algorithm is one ``Algorithm`` entry in its family's list.
"""
from __future__ import annotations

from pyalign.trainers import preference, rl
from pyalign.trainers.fields import Algorithm, applies_to, declared

ALGOS: dict[str, Algorithm] = {algorithm.name: algorithm
                               for algorithm in (*preference.ALGORITHMS, *rl.ALGORITHMS)}
# The embedded task's tuned values of each algorithm (pyalign study reads its knobs' defaults).
TUNED_DEFAULTS = {name: dict(algorithm.tuned) for name, algorithm in ALGOS.items()}


def algorithms_for(key: str, family: str) -> list[str]:
    """The algorithms of ``family`` whose preset config a setting ``key`` applies to."""
    found = []
    for name, algorithm in ALGOS.items():
        fields = declared(algorithm.config_class)
        if algorithm.family == family and key in fields and key not in algorithm.fixed \
                and applies_to(algorithm.preset_config(), fields[key]):
            found.append(name)
    return found


__all__ = ["ALGOS", "TUNED_DEFAULTS", "algorithms_for"]
