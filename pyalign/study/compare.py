"""Do two runs of one study reach the same verdicts? The check that a study's verdicts, not its
single runs, survive a change of machine or thread count (single runs are chaotic: a run
re-made on another CPU matches to 2-3 digits for an epoch, then diverges).

    python -m pyalign.study.compare runs/study-a runs/study-b

reads both directories' summary.json (``verdicts``: claim -> word), prints each claim's two
verdicts, and exits 0 when they all agree, 1 when some differ. A claim shown in one run and not
shown in the other (an interval that crosses 0 in one of them) is a *difference*; one shown in
one run and the opposite in the other, or ahead against behind, a *contradiction*.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

OPPOSITES = {("shown", "opposite"), ("ahead", "behind")}


def load_verdicts(out: str) -> dict:
    path = os.path.join(out, "summary.json")
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())["verdicts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"pyalign.study.compare: error: {path} holds no study verdicts ({exc})") from None


def compare_verdicts(first: dict, second: dict) -> list[tuple[str, str, str, str]]:
    """(claim, first verdict, second verdict, 'same' / 'different' / 'contradicts') per claim."""
    rows = []
    for claim in list(dict.fromkeys([*first, *second])):
        a, b = first.get(claim, "–"), second.get(claim, "–")
        kind = "same" if a == b else "contradicts" if (a, b) in OPPOSITES or (b, a) in OPPOSITES \
            else "different"
        rows.append((claim, a, b, kind))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = compare_verdicts(load_verdicts(args[0]), load_verdicts(args[1]))
    print(f"| claim | {args[0]} | {args[1]} | |\n|---|---|---|---|")
    for claim, a, b, kind in rows:
        print(f"| {claim} | {a} | {b} | {'' if kind == 'same' else kind} |")
    counts = {kind: sum(row[3] == kind for row in rows) for kind in ("same", "different", "contradicts")}
    print(f"\n{counts['same']} of {len(rows)} verdicts agree; {counts['different']} differ; "
          f"{counts['contradicts']} contradict")
    return 0 if counts["same"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
