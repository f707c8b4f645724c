"""A run killed at any step and resumed ends exactly where the uninterrupted run does."""

from __future__ import annotations

import pytest
import torch

from bissl.trainer import RunInterrupted, run_experiment

PHASES = ("pretext", "bissl", "finetune_bissl", "finetune_baseline")


def _assert_same_results(reference: dict, other: dict) -> None:
    for phase in PHASES:
        a, b = reference[phase], other[phase]
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, dict):  # a state dict: bit-identical tensors
                assert value.keys() == b[key].keys()
                for name, t in value.items():
                    assert torch.equal(t, b[key][name]), f"{phase}.{key}.{name}"
            elif isinstance(value, torch.Tensor):  # the test predictions
                assert torch.equal(value, b[key]), f"{phase}.{key}"
            else:
                assert value == b[key], f"{phase}.{key}"
    assert reference["rows"] == other["rows"]  # no duplicated or missing rows after the resume


# Tiny run: pretext 4 steps, bissl 2 warm-up + 2 x (2 lower + 2 upper), fine-tuning 4 + 4 steps.
# Stop after: a pretext step (4 = last), mid warm-up, a lower step, mid-upper (HVP batch redrawn),
# mid fine-tuning of each arm. Checkpoints every 2 steps, so most resumes repeat a step.
@pytest.mark.parametrize("stop_after", [3, 5, 8, 11, 16, 21])
def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_config, reference_run, take_snapshot, stop_after):
    _, ref_results, reference = reference_run
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(tiny_config(f"debug.stop_after_steps={stop_after}"), run_dir)
    assert not (run_dir / "results.json").exists()
    results = run_experiment(tiny_config(), run_dir)
    _assert_same_results(reference, take_snapshot(run_dir))
    assert results["per_seed"] == ref_results["per_seed"]


def test_resume_twice_and_rerun_of_finished_run(tmp_path, tiny_config, reference_run, take_snapshot):
    _, ref_results, reference = reference_run
    run_dir = tmp_path / "run"
    for stop in (7, 6):  # the second interruption lands in the resumed process
        with pytest.raises(RunInterrupted):
            run_experiment(tiny_config(f"debug.stop_after_steps={stop}"), run_dir)
    run_experiment(tiny_config(), run_dir)
    _assert_same_results(reference, take_snapshot(run_dir))
    # A finished run re-reports from its done files without training.
    again = run_experiment(tiny_config("debug.stop_after_steps=1"), run_dir)
    assert again["per_seed"] == ref_results["per_seed"]


def test_resume_refuses_a_different_config(tmp_path, tiny_config):
    from bissl.config import ConfigError

    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        run_experiment(tiny_config("debug.stop_after_steps=1"), run_dir)
    with pytest.raises(ConfigError, match=r"bissl\.lam"):
        run_experiment(tiny_config("bissl.lam=0.5"), run_dir)


@pytest.mark.slow
def test_parallel_seed_workers_match_sequential_run(tmp_path, tiny_config):
    """Seeds in spawned worker processes give exactly the in-process results (same threads)."""
    seq = run_experiment(tiny_config("run.seeds=[0, 1]", "run.num_threads=1"), tmp_path / "seq")
    par = run_experiment(tiny_config("run.seeds=[0, 1]", "run.num_threads=1", "run.workers=2"), tmp_path / "par")
    assert par["workers"] == 2 and seq["workers"] == 1
    assert par["per_seed"] == seq["per_seed"]
    assert par["per_seed"]["0"] != par["per_seed"]["1"]  # the seed changes the run
