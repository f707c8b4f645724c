"""Solver-health study, part B: the ``on_indefinite`` policies inside full BiSSL training runs.

The ``bissl/configs/demo_digits.yaml`` pipeline (digits, SmallCNN, SimCLR, BiSSL stage, fine-tuning),
one run directory per arm, every arm on the same seeds and the same pretext checkpoint (the pretext
phase of the first arm is reused: it depends only on the pretext config and the seed). Arms:

* ``d10/cg``: reference damping 10, global CG, report-only (the policies act only on flagged
  steps; the logged ``cg_indefinite`` column shows whether they would have);
* ``d10/reference``: damping 10, layer-wise CG with NaN → 0 (the reference code's behaviour);
* ``d1/cg``: damping 1 (``λ + λ_damp ≈ 1``, where the system is often indefinite), CG's answer
  kept and logged (= ``on_indefinite="warn"`` without the warnings);
* ``d1/fallback``: damping 1, MINRES (5 iterations) where CG flags the system;
* ``d1/adaptive``: damping 1, damping raised from the Ritz estimate where CG flags the system;
* ``d1/reference``: damping 1, layer-wise CG, NaN → 0;
* ``d1/raise``: damping 1, ``strict: true`` with the default policy: reports the step it stops at.

The baseline (fine-tuning the pretext checkpoint) runs in the first arm. ``--budget quick`` (the
default) shrinks the demo to a few minutes on 2 cores (width 16, 50 pretext epochs, 5 stages);
``--budget demo`` keeps the demo config as is (about 15 minutes on 2 cores).

Writes ``benchmarks/results/solver_health_training.json`` and prints a table: test accuracy per
arm (mean ± std over seeds), the fraction of upper steps flagged indefinite in the first and the
last training stage, and what the policy did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from bissl.config import load_config
from bissl.configs import CONFIG_DIR
from bissl.solvers import SolverError
from bissl.trainer import run_experiment
from bissl.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO = CONFIG_DIR / "demo_digits.yaml"
QUICK = [
    "model.options={width: 16}",
    "pretext.epochs=50",
    "pretext.warmup_epochs=5",
    "bissl.stages=5",
    "finetune.epochs=20",
]
ARMS = {
    "d10/cg": ["bissl.damping=10.0"],
    "d10/reference": ["bissl.damping=10.0", "bissl.solver=cg_layerwise"],
    "d1/cg": ["bissl.damping=1.0"],
    "d1/fallback": ["bissl.damping=1.0", "bissl.on_indefinite=fallback"],
    "d1/adaptive": ["bissl.damping=1.0", "bissl.on_indefinite=adaptive_damping"],
    "d1/reference": ["bissl.damping=1.0", "bissl.solver=cg_layerwise"],
    "d1/raise": ["bissl.damping=1.0", "bissl.strict=true"],
}


def _upper_rows(seed_dir: Path) -> list[dict]:
    return [r for r in read_metrics(seed_dir / "metrics.csv") if r["phase"] == "bissl" and r["part"] == "upper"]


def _health(rows: list[dict]) -> dict:
    stages = sorted({r["round"] for r in rows})
    first = [r for r in rows if r["round"] == stages[0]]
    last = [r for r in rows if r["round"] == stages[-1]]
    frac = lambda rs: sum(bool(r["cg_indefinite"]) for r in rs) / max(len(rs), 1)  # noqa: E731
    acted = [r for r in rows if r["cg_action"] not in (None, "none")]
    damp = [r["cg_damping_used"] for r in acted if r["cg_damping_used"] is not None]
    ritz = [r["cg_ritz_min"] for r in first if r["cg_ritz_min"] is not None]
    return {
        "upper_steps": len(rows),
        "indefinite_first_stage": frac(first),
        "indefinite_last_stage": frac(last),
        "indefinite_all": frac(rows),
        "acted": len(acted),
        "mean_damping_used_when_acted": statistics.fmean(damp) if damp else None,
        "ritz_min_first_stage": statistics.fmean(ritz) if ritz else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=("quick", "demo"), default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-dir", default="/tmp/bissl_solver_health_runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solver_health_training.json"))
    args = ap.parse_args()
    start = time.perf_counter()
    out_dir = Path(args.out_dir)
    base = (QUICK if args.budget == "quick" else []) + [
        f"run.seeds={args.seeds}",
        f"run.workers={args.workers}",
        "run.num_threads=1",
        "run.quiet=true",
    ]
    results: dict = {"budget": args.budget, "seeds": args.seeds, "arms": {}}
    first_dir = None
    for i, arm in enumerate(args.arms):
        run_dir = out_dir / arm.replace("/", "_")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = load_config(DEMO, base + ARMS[arm] + [f"baseline.enabled={'true' if i == 0 else 'false'}"])
        if first_dir is not None:  # reuse the first arm's pretext checkpoints
            for seed in args.seeds:
                ckpt = run_dir / f"seed_{seed}" / "checkpoints"
                ckpt.mkdir(parents=True)
                shutil.copy(first_dir / f"seed_{seed}" / "checkpoints" / "pretext.done.pt", ckpt)
        t0 = time.perf_counter()
        entry: dict = {"overrides": ARMS[arm]}
        try:
            res = run_experiment(cfg, run_dir)
            per_seed = res["per_seed"]  # keyed by str(seed)
            entry["test_acc"] = {s: per_seed[str(s)]["bissl"]["test_acc"] for s in args.seeds}
            if i == 0:
                entry["baseline_test_acc"] = {s: per_seed[str(s)]["baseline"]["test_acc"] for s in args.seeds}
            entry["health"] = {s: _health(_upper_rows(run_dir / f"seed_{s}")) for s in args.seeds}
        except SolverError as err:
            entry["raised"] = str(err)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        results["arms"][arm] = entry
        first_dir = first_dir or run_dir
        print(f"{arm}: {time.perf_counter() - start:.0f}s", flush=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)


def _ms(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def print_table(results: dict) -> None:
    print(f"\nbudget {results['budget']}, seeds {results['seeds']}, wall {results['wall_s']} s")
    print(f"{'arm':16s} {'test acc %':>14s} {'indef. 1st':>10s} {'indef. last':>11s} {'acted':>6s}  notes")
    for arm, e in results["arms"].items():
        if "raised" in e:
            print(f"{arm:16s} {'raised':>14s}  {e['raised'][:110]}")
            continue
        h = list(e["health"].values())
        first = statistics.fmean(x["indefinite_first_stage"] for x in h)
        last = statistics.fmean(x["indefinite_last_stage"] for x in h)
        acted = sum(x["acted"] for x in h)
        steps = sum(x["upper_steps"] for x in h)
        note = ""
        if "baseline_test_acc" in e:
            note = f"baseline {_ms(list(e['baseline_test_acc'].values()))}"
        damp = [x["mean_damping_used_when_acted"] for x in h if x["mean_damping_used_when_acted"]]
        if damp and "adaptive" in arm:
            note = f"mean damping used {statistics.fmean(damp):.3g}"
        print(
            f"{arm:16s} {_ms(list(e['test_acc'].values())):>14s} {first:>10.2f} {last:>11.2f} "
            f"{acted:>3d}/{steps:<3d} {note}"
        )


if __name__ == "__main__":
    main()
