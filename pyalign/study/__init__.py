"""The KL-budget study (``pyalign study``): does a method reach more gold reward at less drift,
and do the over-optimisation, length and scale claims hold?

    grid = pyalign.study.parse_grid(pyalign.study.PRESETS["default"], "default")
    jobs = pyalign.study.prepare(grid, "runs/study")      # one `pyalign train` config per point
    pyalign.study.run_pool(jobs, workers=2)               # or run_ray(jobs), or any scheduler
    grid, rows, missing, damaged = pyalign.study.aggregate("runs/study")   # points.csv
    pyalign.study.write_report("runs/study", grid, rows, missing, damaged=damaged)  # PNGs, report.md

Modules: ``grid`` (the grid, its points, their checks), ``presets`` (the built-in grids),
``point`` (one point: train, evaluate at its steps), ``evaluation`` (what an evaluation
measures; ``data_evaluation`` on one's own model), ``userdata`` (a study of one's own model and
data: its grid keys, held-out split and checks), ``measures`` (what quality is: gold, or the
held-out preference accuracy), ``runner`` (study layout and lock, process pool, Ray,
aggregation), ``stats`` (the intervals over seeds), ``fits`` (R(d) = d(a − b log d), its
bootstrap and when it holds), ``frontiers`` (Pareto frontiers, budget tables, method-pair
verdicts), ``claims`` (over-optimisation, length and scale verdicts), ``plots``, ``report`` and
``compare`` (two runs' verdicts side by side).
"""
from pyalign.study.fits import fit_hump, fit_table
from pyalign.study.frontiers import budget_table, compare_pairs, pareto_frontier
from pyalign.study.grid import Grid, GridError, Point, parse_grid
from pyalign.study.presets import PRESETS
from pyalign.study.report import write_report
from pyalign.study.runner import aggregate, prepare, run_pool, run_ray

__all__ = ["Grid", "GridError", "Point", "parse_grid", "PRESETS", "prepare", "run_pool", "run_ray",
           "aggregate", "fit_hump", "fit_table", "pareto_frontier", "budget_table", "compare_pairs",
           "write_report"]
