"""Run outputs: results.json, curves.png, metrics CSV, checkpoints; loop errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from bissl.trainer import NonFiniteLossError, Phase, RunContext, run_experiment, run_phase
from bissl.trainer.checkpoint import load_checkpoint, save_atomic
from bissl.trainer.metrics import COLUMNS, MetricsLog, read_metrics
from bissl.trainer.report import format_table, mean_std, summarize


def test_run_directory_contents(reference_run):
    run_dir, results, _ = reference_run
    assert json.loads((run_dir / "results.json").read_text()) == results
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["bissl"]["lam"] == 0.001 and saved["model"]["options"] == {"width": 4}
    ckpts = sorted(p.name for p in (run_dir / "seed_0" / "checkpoints").iterdir())
    assert ckpts == [
        "bissl.done.pt",
        "finetune_baseline.done.pt",
        "finetune_bissl.done.pt",
        "pretext.done.pt",
    ]  # in-progress checkpoints and temporary files are gone
    rows = read_metrics(run_dir / "seed_0" / "metrics.csv")
    header = (run_dir / "seed_0" / "metrics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    by_part = {}
    for r in rows:
        by_part.setdefault((r["phase"], r["part"]), []).append(r)
    assert {k: len(v) for k, v in by_part.items()} == {
        ("pretext", "pretext"): 4,
        ("bissl", "warmup"): 3,
        ("bissl", "lower"): 4,
        ("bissl", "upper"): 4,
        ("finetune_bissl", "train"): 4,
        ("finetune_bissl", "eval"): 1,
        ("finetune_baseline", "train"): 4,
        ("finetune_baseline", "eval"): 1,
    }
    for r in by_part[("bissl", "upper")]:
        assert r["cg_iters"] >= 1 and r["cg_residual"] >= 0 and r["loss_theta"] > 0
        assert r["cg_converged"] in (0, 1) and r["cg_nonfinite"] == 0
    assert all(r["prox"] >= 0 for r in by_part[("bissl", "lower")])
    # the results match what the done checkpoints hold
    done = load_checkpoint(run_dir / "seed_0" / "checkpoints" / "finetune_bissl.done.pt")["result"]
    assert results["per_seed"]["0"]["bissl"]["test_acc"] == done["test_acc"]
    assert results["summary"]["bissl"]["test_acc"]["n"] == 1


def test_summary_statistics_and_table():
    per_seed = {
        0: {
            "bissl": {"test_acc": 0.9, "val_acc": 0.8, "test_loss": 1.0, "val_loss": 1.0},
            "baseline": {"test_acc": 0.8, "val_acc": 0.8, "test_loss": 1.0, "val_loss": 1.0},
        },
        1: {
            "bissl": {"test_acc": 0.7, "val_acc": 0.6, "test_loss": 2.0, "val_loss": 1.0},
            "baseline": {"test_acc": 0.8, "val_acc": 0.7, "test_loss": 1.5, "val_loss": 1.0},
        },
    }
    res = summarize(per_seed)
    assert res["summary"]["bissl"]["test_acc"]["mean"] == pytest.approx(0.8)
    assert res["summary"]["bissl"]["test_acc"]["std"] == pytest.approx(math.sqrt(0.02))  # ddof=1
    assert res["summary"]["bissl_minus_baseline_test_acc"]["mean"] == pytest.approx(0.0)
    table = format_table(res)
    assert "90.00" in table and "+10.00" in table and "-10.00" in table
    assert "80.00 ± 14.14" in table
    assert mean_std([2.0]) == {"mean": 2.0, "std": 0.0, "n": 1}


def test_results_carry_paired_statistics_and_mcnemar():
    # Seeds 0..3: BiSSL − baseline = +2, +1, +3, −1 points; per-example correctness of 5 examples.
    per_seed = {}
    for seed, (b, s) in enumerate([(0.90, 0.92), (0.80, 0.81), (0.85, 0.88), (0.70, 0.69)]):
        per_seed[seed] = {
            "bissl": {"test_acc": s, "val_acc": s, "test_loss": 1.0, "val_loss": 1.0, "test_correct": [1, 1, 1, 0, 1]},
            "baseline": {
                "test_acc": b,
                "val_acc": b,
                "test_loss": 1.0,
                "val_loss": 1.0,
                "test_correct": [1, 0, 1, 0, 0],
            },
        }
    paired = summarize(per_seed)["summary"]["bissl_vs_baseline"]
    t = paired["test_acc"]
    assert t["n"] == 4 and t["mean"] == pytest.approx(0.0125)
    assert t["ci_low"] < t["mean"] < t["ci_high"]
    from scipy import stats

    assert t["p_t"] == pytest.approx(stats.ttest_1samp([0.02, 0.01, 0.03, -0.01], 0.0).pvalue)
    # 4 seeds × 2 examples only BiSSL got right, none the other way: p = 2 · 0.5^8.
    assert (paired["mcnemar"]["only_a"], paired["mcnemar"]["only_b"]) == (8, 0)
    assert paired["mcnemar"]["p"] == pytest.approx(2 * 0.5**8)
    table = format_table(summarize(per_seed))
    assert "bootstrap interval" in table and "McNemar" in table and "only BiSSL right 8" in table
    assert "bissl_vs_baseline" not in summarize({0: per_seed[0]})["summary"]  # one seed: no test


def test_control_arms_and_disabled_baseline(tmp_path, tiny_config):
    """Three arms and the ablation: the compute-matched baseline runs stages × lower_steps pretext
    steps with the lower level's schedule, the ablation runs the BiSSL stage without upper steps;
    every arm is fine-tuned and compared with BiSSL, paired."""
    cfg = tiny_config("baseline.compute_matched=true", "baseline.ablation_upper0=true", "run.seeds=[0, 1]")
    res = run_experiment(cfg, tmp_path / "arms")
    rows = read_metrics(tmp_path / "arms" / "seed_0" / "metrics.csv")
    matched = [r for r in rows if r["phase"] == "pretext_matched"]
    assert len(matched) == 2 * 2  # stages x lower_steps, with the lower-level LARS schedule
    assert matched[0]["lr"] == 1.0
    upper0 = [r for r in rows if r["phase"] == "bissl_upper0"]
    assert {r["part"] for r in upper0} == {"warmup", "lower"} and sum(r["part"] == "lower" for r in upper0) == 4
    # Same lower batches as BiSSL's (the stage's data order is the seed's, not the phase's): the
    # first lower step, before any upper step could differ, gives the same loss.
    first = {p: next(r for r in rows if r["phase"] == p and r["part"] == "lower") for p in ("bissl", "bissl_upper0")}
    assert first["bissl"]["loss"] == pytest.approx(first["bissl_upper0"]["loss"], rel=1e-6)
    for arm in ("baseline", "baseline_matched", "bissl_upper0", "bissl"):
        assert res["summary"][arm]["test_acc"]["n"] == 2
        assert all(res["per_seed"][s][arm]["test_correct"] for s in ("0", "1"))
    for other in ("baseline", "baseline_matched", "bissl_upper0"):
        assert res["summary"][f"bissl_vs_{other}"]["test_acc"]["n"] == 2
        diffs = [res["per_seed"][s]["bissl"]["test_acc"] - res["per_seed"][s][other]["test_acc"] for s in ("0", "1")]
        assert res["summary"][f"bissl_minus_{other}_test_acc"]["mean"] == pytest.approx(sum(diffs) / 2)
    table = format_table(res)
    assert "matched" in table.splitlines()[0] and "no upper" in table.splitlines()[0]
    assert "BiSSL − matched over 2 seeds" in table and "BiSSL − no upper over 2 seeds" in table
    ckpts = {p.name for p in (tmp_path / "arms" / "seed_1" / "checkpoints").iterdir()}
    assert {"finetune_baseline_matched.done.pt", "finetune_bissl_upper0.done.pt", "bissl_upper0.done.pt"} <= ckpts
    res = run_experiment(tiny_config("baseline.enabled=false", "baseline.compute_matched=true"), tmp_path / "nobase")
    assert res["per_seed"]["0"]["baseline"] is None and "baseline" not in res["summary"]
    assert "baseline_matched" not in res["per_seed"]["0"]  # enabled: false switches every control arm off
    assert "—" in format_table(res)


def test_bissl_stage_diagnostics(tmp_path, tiny_config):
    """prox_share lies where the triangle inequality puts it; the exact-solve cosine is logged on
    the first upper step of each stage, near 1 when CG runs to convergence; results.json and the
    table carry their per-seed summary."""
    res = run_experiment(tiny_config("bissl.cg_iters=200", "bissl.exact_check_iters=400"), tmp_path / "diag")
    rows = [r for r in read_metrics(tmp_path / "diag" / "seed_0" / "metrics.csv") if r["phase"] == "bissl"]
    lower = [r for r in rows if r["part"] == "lower"]
    assert lower[0]["prox_share"] == 0.0  # θ = φ at the first lower step
    for r in lower[1:]:
        p, g = r["prox_grad_norm"], r["pretext_grad_norm"]
        assert p / (g + p) - 1e-9 <= r["prox_share"] <= p / abs(g - p) + 1e-9 and 0 < r["prox_share"] <= 1
    upper = [r for r in rows if r["part"] == "upper"]
    checked = [r["hg_cos_exact"] for r in upper if r["hg_cos_exact"] is not None]
    assert len(checked) == 2 and [r["hg_cos_exact"] is not None for r in upper] == [True, False, True, False]
    assert min(checked) > 0.999
    diag = res["per_seed"]["0"]["diagnostics"]
    assert diag["distance_final"] == lower[-1]["distance"] and diag["hg_cos_exact_min"] == min(checked)
    assert res["summary"]["diagnostics"]["hg_cos_exact_mean"]["mean"] == pytest.approx(sum(checked) / 2)
    assert "cosine to an exact solve" in format_table(res)
    # A one-iteration solve is measurably further from the exact one.
    res1 = run_experiment(tiny_config("bissl.cg_iters=1", "bissl.exact_check_iters=400"), tmp_path / "diag1")
    assert res1["per_seed"]["0"]["diagnostics"]["hg_cos_exact_min"] < min(checked)


class _Exploding(Phase):
    name = "explode"

    def __init__(self):
        super().__init__(total_steps=5)
        self.w = torch.zeros(())

    def step(self):
        self.step_idx += 1
        return [{"part": "train", "loss": torch.tensor(float("nan") if self.step_idx == 3 else 1.0)}]

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]

    def result(self):
        return {}

    def describe_step(self, step):
        return f"toy step {step}"


def test_nonfinite_loss_names_phase_and_step(tmp_path):
    ctx = RunContext(
        seed=7,
        device=torch.device("cpu"),
        ckpt_dir=tmp_path / "ck",
        metrics=MetricsLog(tmp_path / "m.csv"),
        checkpoint_every=2,
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss \(nan\) in phase 'explode' at toy "
        r"step 3 \(seed 7\); its last checkpoint is at step 2",
    ):
        run_phase("explode", _Exploding, ctx)
    assert (tmp_path / "ck" / "explode.pt").exists()  # the step-2 checkpoint survives
    assert load_checkpoint(tmp_path / "ck" / "explode.pt")["step_idx"] == 2


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "c.pt"
    save_atomic({"x": 1}, path)
    save_atomic({"x": 2}, path)
    assert load_checkpoint(path) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"x": Unpicklable()}, path)
    assert load_checkpoint(path) == {"x": 2}  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_metrics_log_truncate(tmp_path):
    log = MetricsLog(tmp_path / "m.csv")
    log.log({"seed": 0, "phase": "p", "part": "x", "step": 1, "loss": 0.5})
    offset = log.offset()
    log.log({"seed": 0, "phase": "p", "part": "x", "step": 2, "loss": 0.25})
    log.truncate(offset)
    log.log({"seed": 0, "phase": "p", "part": "x", "step": 3, "loss": 0.125})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.csv")] == [1.0, 3.0]
    with pytest.raises(KeyError, match="bogus"):
        MetricsLog(tmp_path / "n.csv").log({"bogus": 1})
