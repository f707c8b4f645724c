"""Extract the BiSSL stage's exact-solve checks of a run into a small CSV that docs can ship.

Every upper step that compared the hypergradient with a many-iteration MINRES solve
(``bissl.exact_check_iters`` > 0, once per stage) becomes one row: seed, stage, the cosine, and
the step's own solver diagnostics (action, indefinite flag, residual, Ritz range of the damped
system). The runs' ``metrics.csv`` files are too large to ship; this is the part docs/study.md
reads.

    python benchmarks/exact_checks.py runs/study/lowlabel docs/study/lowlabel/exact_checks.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bissl.trainer.metrics import read_metrics

COLUMNS = ("seed", "round", "hg_cos_exact", "cg_action", "cg_indefinite", "cg_residual", "cg_ritz_min", "cg_ritz_max")


def exact_checks(run_dir: Path) -> list[dict]:
    """The checked upper steps of every seed of ``run_dir``, in seed and stage order."""
    rows = []
    for seed_dir in sorted(run_dir.glob("seed_*"), key=lambda p: int(p.name.split("_")[1])):
        seed = int(seed_dir.name.split("_")[1])
        for r in read_metrics(seed_dir / "metrics.csv"):
            if r["phase"] == "bissl" and r["part"] == "upper" and r.get("hg_cos_exact") is not None:
                rows.append({"seed": seed, **{k: r.get(k) for k in COLUMNS[1:]}})
    if not rows:
        raise SystemExit(f"{run_dir}: no exact-solve checks (was bissl.exact_check_iters 0?)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows = exact_checks(args.run_dir)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} checked upper steps -> {args.out}")


if __name__ == "__main__":
    main()
