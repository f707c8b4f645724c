"""Grid parsing, validation (one-line errors before anything runs), cells and their names."""

from __future__ import annotations

from pathlib import Path

import pytest

from bissl.config import ConfigError
from bissl.sweep.grid import (
    MAX_NAME_LENGTH,
    cell_names,
    make_cells,
    parse_grid_args,
    short_keys,
    split_values,
    validate_grid,
)
from bissl.sweep.plan import build_plan

TINY = Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml"


def test_values_are_yaml_and_keep_order():
    grid = parse_grid_args(
        [
            "bissl.lam=1e-3,1e-2, 0.5",
            "bissl.solver=cg,identity",
            "finetune.augment=none,crop",
            "baseline.compute_matched=true,false",
        ]
    )
    assert grid == {
        "bissl.lam": [0.001, 0.01, 0.5],
        "bissl.solver": ["cg", "identity"],
        "finetune.augment": ["none", "crop"],
        "baseline.compute_matched": [True, False],
    }
    assert all(isinstance(v, float) for v in grid["bissl.lam"])
    assert list(grid) == ["bissl.lam", "bissl.solver", "finetune.augment", "baseline.compute_matched"]


def test_commas_inside_brackets_and_quotes_do_not_split():
    assert split_values("[16, 16, 8],[32,8], 'a,b', \"c\"") == ["[16, 16, 8]", "[32,8]", "'a,b'", '"c"']
    grid = parse_grid_args(["pretext.projector_dims=[16,16,8],[32, 32, 8]"])
    assert grid == {"pretext.projector_dims": [[16, 16, 8], [32, 32, 8]]}
    with pytest.raises(ConfigError, match="unbalanced"):
        split_values("[1, 2")


@pytest.mark.parametrize(
    "items, message",
    [
        (["bissl.lam"], "must look like 'section.key=value1,value2"),
        (["bissl.lam=1e-3,,1e-2"], "empty value"),
        (["bissl.lam=1e-3", "bissl.lam=1e-2"], "given twice"),
        (["bissl lam=1"], "must be dotted names"),
    ],
)
def test_malformed_grid_arguments(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid_args(items)


@pytest.mark.parametrize(
    "grid, overrides, message",
    [
        ({"bissl.lamda": [1e-3]}, (), "--grid bissl.lamda=0.001: unknown key 'bissl.lamda' (did you mean 'lam'?)"),
        ({"bissl.lam": [1e-3, "big"]}, (), "--grid bissl.lam=big: 'bissl.lam' must be a number, got 'big'"),
        ({"bissl.lam": [1e-3, -1.0]}, (), "--grid bissl.lam=-1.0: 'bissl.lam' must be > 0, got -1.0"),
        ({"bissl.solver": ["cg", "gmres"]}, (), "--grid bissl.solver=gmres: 'bissl.solver' must be one of"),
        ({"bissl.lam": []}, (), "--grid bissl.lam: needs a non-empty list of values"),
        ({"bissl.lam": [1e-3, 1e-3]}, (), "--grid bissl.lam: value 0.001 is listed twice"),
        ({"bissl.lam": [1, 1.0]}, (), "resolve to the same config"),
        ({"bissl.lam": [1e-3]}, ("bissl.lam=0.5",), "'bissl.lam' is both swept (--grid) and fixed (--set)"),
        ({"run.seeds": [[0], [1]]}, (), "cannot sweep 'run.seeds': use --seeds N"),
        ({"debug.stop_after_steps": [1, 2]}, (), "cannot sweep 'debug.stop_after_steps'"),
        ({}, (), "the grid is empty"),
        # Each value is valid alone; one combination is not (cross-field check of the config).
        (
            {"data.val_fraction": [0.1, 0.5], "data.test_fraction": [0.2, 0.6]},
            (),
            "cell val_fraction=0.5__test_fraction=0.6: 'data.val_fraction' + 'data.test_fraction' must be < 1",
        ),
    ],
)
def test_every_key_value_and_cell_is_validated_with_one_line(grid, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_grid(TINY, grid, list(overrides))
    text = str(err.value)
    assert "\n" not in text and text.startswith("config error: ")
    assert message in text


def test_bad_fixed_override_or_seeds_fail_in_the_plan(tmp_path):
    with pytest.raises(ConfigError, match=r"'bissl\.cg_iters' must be >= 0"):
        build_plan(TINY, {"bissl.lam": [1e-3]}, overrides=["bissl.cg_iters=-1"])
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        build_plan(TINY, {"bissl.lam": [1e-3]}, seeds=0)
    with pytest.raises(ConfigError, match="cannot read"):
        build_plan(tmp_path / "missing.yaml", {"bissl.lam": [1e-3]})
    with pytest.raises(ConfigError, match=r"--grid bissl\.lam: values must be plain numbers"):
        build_plan(TINY, {"bissl.lam": [1e-3, object()]})
    with pytest.raises(ConfigError, match=r"--grid bissl\.lam: needs a non-empty list of values"):
        build_plan(TINY, {"bissl.lam": "1e-3"})


def test_cartesian_product_first_key_slowest():
    cells = make_cells({"bissl.lam": [0.001, 0.1], "bissl.solver": ["cg", "identity", "minres"]})
    assert [c.values for c in cells] == [
        {"bissl.lam": lam, "bissl.solver": s} for lam in (0.001, 0.1) for s in ("cg", "identity", "minres")
    ]
    assert [c.name for c in cells][:2] == ["lam=0.001__solver=cg", "lam=0.001__solver=identity"]
    assert cells[0].overrides() == ["bissl.lam=0.001", 'bissl.solver="cg"']


def test_short_keys_are_unique_suffixes():
    assert short_keys(["bissl.lam", "bissl.solver"]) == {"bissl.lam": "lam", "bissl.solver": "solver"}
    assert short_keys(["bissl.lower.lr", "bissl.upper.lr", "finetune.lr"]) == {
        "bissl.lower.lr": "lower.lr",
        "bissl.upper.lr": "upper.lr",
        "finetune.lr": "finetune.lr",
    }
    assert short_keys(["bissl.lr", "bissl.lower.lr"]) == {"bissl.lr": "bissl.lr", "bissl.lower.lr": "lower.lr"}


def test_cell_names_are_filesystem_safe_unique_and_bounded():
    grid = {
        "data.root": ["/data/a b", "/data/a_b"],
        "pretext.projector_dims": [[16, 8]],
        "model.options": [{"width": 4}],
    }
    names = cell_names(grid, [(r, [16, 8], {"width": 4}) for r in grid["data.root"]])
    assert all("/" not in n and " " not in n for n in names)
    assert len(set(names)) == 2  # equal after making them safe: a hash tells them apart
    assert names[0].startswith("root=_data_a_b__projector_dims=16-8__options=width4_")
    assert cell_names({"bissl.lam": [0.5]}, [(0.5,)]) == ["lam=0.5"]
    huge = cell_names({"data.root": ["x" * 300]}, [("x" * 300,)])[0]
    assert len(huge) <= MAX_NAME_LENGTH and huge.startswith("root=xxx")
    assert cell_names({"data.root": [".hidden"]}, [(".hidden",)])[0] == "root=.hidden"
