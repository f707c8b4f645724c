"""The sharing rule, and that a cell started from the shared pretext checkpoint is bit-identical
to the same cell run from scratch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bissl.config import load_config
from bissl.sweep import build_plan, parts_affected
from bissl.sweep.sharing import BASELINE_ARM, BISSL_ARM, PRETEXT
from bissl.trainer import run_experiment
from bissl.trainer.checkpoint import load_checkpoint
from bissl.trainer.metrics import read_metrics

TINY = Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml"
ALL = {PRETEXT, BISSL_ARM, BASELINE_ARM}


@pytest.mark.parametrize(
    "key, matched, parts",
    [
        ("bissl.lam", False, {BISSL_ARM}),
        ("bissl.upper.lr", True, {BISSL_ARM}),
        ("bissl.stages", False, {BISSL_ARM}),
        ("bissl.stages", True, {BISSL_ARM, BASELINE_ARM}),  # the compute-matched baseline reads it
        ("bissl.lower.lr", True, {BISSL_ARM, BASELINE_ARM}),
        ("bissl.lower_steps", True, {BISSL_ARM, BASELINE_ARM}),
        ("finetune.lr", False, {BISSL_ARM, BASELINE_ARM}),
        ("baseline.compute_matched", False, {BASELINE_ARM}),
        ("pretext.lr", False, ALL),
        ("model.options.width", False, ALL),
        ("data.split_seed", False, ALL),
        ("run.num_threads", False, ALL),
        ("task", False, ALL),
        ("run.log_every", False, set()),
    ],
)
def test_parts_affected(key, matched, parts):
    assert parts_affected(key, compute_matched=matched) == parts


@pytest.mark.parametrize(
    "grid, overrides, pretext, baseline, blocker",
    [
        ({"bissl.lam": [1e-3, 1e-2], "bissl.solver": ["cg", "identity"]}, [], True, True, None),
        ({"finetune.lr": [0.01, 0.05]}, [], True, False, "finetune.lr"),
        ({"bissl.lam": [1e-3, 1e-2]}, ["baseline.enabled=false"], True, False, None),
        ({"bissl.stages": [1, 2]}, ["baseline.compute_matched=true"], True, False, "bissl.stages"),
        ({"bissl.lam": [1e-3, 1e-2], "pretext.lr": [0.5, 1.0]}, [], False, False, "pretext.lr"),
    ],
)
def test_plan_sharing(grid, overrides, pretext, baseline, blocker):
    plan = build_plan(TINY, grid, seeds=1, overrides=overrides)
    assert (plan.sharing.pretext, plan.sharing.baseline) == (pretext, baseline)
    assert plan.sharing.provider == (plan.cells[0].name if pretext else None)
    if blocker:
        assert f"'{blocker}'" in plan.sharing.reason
    # Only the cells after the provider skip the baseline, and only when it is shared.
    skip = [
        c.name
        for c in plan.cells
        if "baseline.enabled=false" in plan.run_overrides(c) and "baseline.enabled=false" not in overrides
    ]
    assert skip == ([c.name for c in plan.cells[1:]] if baseline else [])


def test_no_share_and_single_cell_share_nothing():
    assert not build_plan(TINY, {"bissl.lam": [1e-3, 1e-2]}, share=False).sharing.pretext
    assert not build_plan(TINY, {"bissl.lam": [1e-3]}).sharing.pretext


def _states_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, dict):
            _states_equal(value, b[key], f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"


@pytest.mark.slow  # trains cells of the tiny config (seconds each)
def test_shared_cell_is_bit_identical_to_a_cell_run_from_scratch(tiny_sweep, tmp_path):
    """Cell 2 (pretext hard-linked from cell 1, no baseline arm of its own) vs the same config run
    alone with every phase, for seed 1."""
    provider, shared = tiny_sweep.plan.cells
    shared_dir = tiny_sweep.out / "cells" / shared.name
    assert tiny_sweep.plan.sharing.pretext and tiny_sweep.plan.sharing.baseline
    assert [o.pretext_from for o in tiny_sweep.outcomes] == [[], [provider.name]]
    link = shared_dir / "seed_1" / "checkpoints" / "pretext.done.pt"
    src = tiny_sweep.out / "cells" / provider.name / "seed_1" / "checkpoints" / "pretext.done.pt"
    assert os.stat(link).st_ino == os.stat(src).st_ino  # a hard link, not a recomputation
    assert not (shared_dir / "seed_1" / "checkpoints" / "finetune_baseline.done.pt").exists()

    scratch = tmp_path / "scratch"
    results = run_experiment(load_config(TINY, [*shared.overrides(), "run.seeds=[1]"]), scratch)
    cell_results = json.loads((shared_dir / "results.json").read_text())
    assert cell_results["per_seed"]["1"]["bissl"] == results["per_seed"]["1"]["bissl"]
    assert cell_results["per_seed"]["1"]["baseline"] is None
    # The provider's baseline (what the sweep reports for this cell) is the scratch run's.
    provider_dir = tiny_sweep.out / "cells" / provider.name
    provider_results = json.loads((provider_dir / "results.json").read_text())
    assert provider_results["per_seed"]["1"]["baseline"] == results["per_seed"]["1"]["baseline"]
    for phase in ("pretext", "bissl", "finetune_bissl"):
        ours = load_checkpoint(shared_dir / "seed_1" / "checkpoints" / f"{phase}.done.pt")["result"]
        theirs = load_checkpoint(scratch / "seed_1" / "checkpoints" / f"{phase}.done.pt")["result"]
        _states_equal(ours, theirs, phase)

    # Same metric rows (the pretext ones copied from the provider), wall times aside.
    def rows(run_dir: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k != "wall_s"}
            for r in read_metrics(run_dir / "seed_1" / "metrics.csv")
            if r["phase"] != "finetune_baseline"
        ]

    assert rows(shared_dir) == rows(scratch)
    assert any(r["phase"] == "pretext" for r in rows(shared_dir))
