"""Bad grids get a clear error before any run: nothing is trained, nothing written."""
import copy
import os

import pytest

from pyalign.study.grid import STRENGTH_KNOBS, GridError, parse_grid
from pyalign.study.presets import PRESETS
from pyalign.trainers.presets import ALGOS

GOOD = {"seeds": [0], "epochs": [0.5, 1.0], "algos": {"dpo": {"beta": [0.1, 0.2]},
                                                     "tr-dpo": {"tr_tau": [4, 8], "beta": 0.1}}}


def _with(**algos):
    grid = copy.deepcopy(GOOD)
    grid["algos"] = algos
    return grid


@pytest.mark.parametrize("grid, message", [
    (_with(dpoo={"beta": [0.1]}), "unknown algorithm 'dpoo'"),
    (_with(dpo={"beta": []}), "the sweep of 'beta' is empty"),
    (_with(dpo={"kl_coef": [0.1, 0.2]}), "'kl_coef' is not a strength knob of dpo"),
    (_with(rloo={"tr_tau": [4, 8]}), "'tr_tau' is not a strength knob of rloo"),
    (_with(dpo={"beta": [0.1], "tr_tau": 8}), "'tr_tau' does not apply to algo dpo"),
    (_with(dpo={"beta": 0.1}), "must sweep exactly one knob"),
    (_with(dpo={"beta": [0.1], "lr": [1e-3, 1e-2]}), "must sweep exactly one knob"),
    (_with(dpo={"beta": [0.1, -1.0]}), "'beta' must be > 0"),
    (_with(dpo={"beta": [0.1, "x"]}), "must hold"),
    ({**GOOD, "algos": {}}, "must name at least one algorithm"),
    ({**GOOD, "seeds": []}, "'seeds' must be a non-empty list"),
    ({**GOOD, "epochs": [1.0, 0.5]}, "'epochs' must be increasing"),
    ({**GOOD, "colour": 1}, "unknown grid key(s) 'colour'"),
    ({**GOOD, "preference": {"num_examples": 4, "batch_size": 8}}, "num_examples"),
])
def test_bad_grid_is_a_clear_error(grid, message):
    with pytest.raises(GridError) as info:
        parse_grid(grid)
    assert message in str(info.value)


def test_presets_are_valid_grids_and_the_default_has_its_promised_shape():
    for name, raw in PRESETS.items():
        parse_grid(raw, name)
    points = parse_grid(PRESETS["default"], "default").points()
    assert {p.algo for p in points} == {"dpo", "ipo", "slic", "tr-dpo"}
    assert len({p.seed for p in points}) >= 2
    for algo in ("dpo", "ipo", "slic"):
        assert len({p.value for p in points if p.algo == algo}) == 4
    assert all(p.epochs[0] == 0 and p.epochs[-1] == 2.0 and 0.125 in p.epochs for p in points)


def test_a_study_directory_resumes_only_its_own_grid(tmp_path):
    from pyalign.study.runner import prepare
    prepare(parse_grid(GOOD), str(tmp_path))
    prepare(parse_grid(copy.deepcopy(GOOD)), str(tmp_path))  # the same grid: resumable
    other = copy.deepcopy(GOOD)
    other["seeds"] = [0, 1]
    with pytest.raises(GridError, match="holds a study of another grid"):
        prepare(parse_grid(other), str(tmp_path))


def test_cli_rejects_a_bad_grid_before_any_run(tmp_path, run_cli, study_env):
    grid = tmp_path / "bad.toml"
    grid.write_text("[algos.dpo]\nbeta = [0.1]\n[algos.frobnicate]\nbeta = [0.1]\n")
    out = tmp_path / "out"
    result = run_cli(["--grid", str(grid), "--out", str(out)], study_env)
    assert result.returncode == 2
    assert "pyalign study: error: unknown algorithm 'frobnicate'" in result.stderr
    assert not os.path.exists(out)


def test_point_ids_cannot_collide_and_keep_their_short_form():
    grid = parse_grid({"seeds": [0], "algos": {"dpo": {"beta": [0.1, 0.10000001, 1.0, 2.5e-05]}}})
    ids = [p.point_id for p in grid.points()]
    assert ids == ["dpo__beta=0.1__seed0", "dpo__beta=0.10000001__seed0", "dpo__beta=1__seed0",
                   "dpo__beta=2.5e-05__seed0"]
    with pytest.raises(GridError, match="values repeat"):
        parse_grid({"seeds": [0], "algos": {"dpo": {"beta": [1, 1.0]}}})


def test_a_size_ladder_is_one_point_per_size_with_that_model():
    from pyalign.study.grid import train_config
    from pyalign.tasks import MODEL_SIZES
    grid = parse_grid({**GOOD, "sizes": ["small", "large"], "task": {"variable_length": True}})
    points = [p for p in grid.points() if p.algo == "dpo"]
    assert [(p.value, p.size) for p in points] == [(0.1, "small"), (0.1, "large"), (0.2, "small"),
                                                   (0.2, "large")]
    assert points[1].point_id == "dpo__beta=0.1__size=large__seed0"
    config = train_config(points[1], grid.spec, "out")
    assert config["task"] == {"variable_length": True, **MODEL_SIZES["large"]}
    assert config["study"]["size"] == "large"
    for sizes, message in ((["huge"], "must be distinct names of model sizes"),
                           (["small", "small"], "must be distinct names")):
        with pytest.raises(GridError, match=message):
            parse_grid({**GOOD, "sizes": sizes})
    with pytest.raises(GridError, match="sets the model's hidden_size"):
        parse_grid({**GOOD, "sizes": ["small"], "task": {"hidden_size": 16}})
    with pytest.raises(GridError, match="task.length_bias' must be >= 0"):
        parse_grid({**GOOD, "task": {"variable_length": True, "length_bias": -1.0}})


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algorithm_sweeps_its_strength_knobs(algo):
    """Each algorithm of pyalign train has strength knobs, and a grid sweeping each resolves as
    pyalign train resolves the point's config (parse_grid runs check_point on every point)."""
    assert STRENGTH_KNOBS.get(algo), f"{algo} has no strength knob"
    for knob in STRENGTH_KNOBS[algo]:
        values = [100, 200] if knob == "er_reset_every" else [0.5, 0.9] if knob == "er_ema_decay" \
            else [4, 8] if knob == "tr_tau" else [0.1, 0.2]
        grid = parse_grid({"seeds": [0], "epochs": [1.0], "algos": {algo: {knob: values}}})
        assert [(p.knob, p.value) for p in grid.points()] == [(knob, v) for v in values]
