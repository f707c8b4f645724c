"""``results.json`` (per-seed and mean ± std accuracies of both arms, paired statistics of their
difference) and the printed table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARMS = ("baseline", "bissl")
#: The per-arm final metrics of a run (results.json, sweeps).
METRICS = ("test_acc", "val_acc", "test_loss", "val_loss")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize(
    per_seed: dict[int, dict[str, dict[str, float] | None]], *, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Aggregate per-seed results of both arms.

    Args:
        per_seed: ``{seed: {"bissl": {...metrics}, "baseline": {...} or None}}``.
        meta: extra fields stored as they are (dataset, backbone, wall time...).
    """
    seeds = sorted(per_seed)
    summary: dict[str, Any] = {}
    by_arm: dict[str, list[dict[str, float]]] = {}  # the arms every seed has, in seed order
    for arm in ARMS:
        results = [r for r in (per_seed[s].get(arm) for s in seeds) if r is not None]
        if len(results) < len(seeds):
            continue
        by_arm[arm] = results
        summary[arm] = {m: mean_std([r[m] for r in results]) for m in METRICS}
    if all(arm in by_arm for arm in ARMS):
        diffs = [b["test_acc"] - a["test_acc"] for b, a in zip(by_arm["bissl"], by_arm["baseline"])]
        summary["bissl_minus_baseline_test_acc"] = mean_std(diffs)
        if len(seeds) >= 2:
            summary["bissl_vs_baseline"] = paired_statistics(per_seed)
    return {
        "seeds": seeds,
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "summary": summary,
        "notes": "accuracies are top-1 fractions in [0, 1]; std is the sample standard deviation "
        "over seeds (ddof=1); test accuracy is of the final fine-tuning epoch (the test "
        "split is never used for selection)",
        **(meta or {}),
    }


def paired_statistics(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """BiSSL − baseline test accuracy over the seeds, paired: mean, 95% bootstrap interval, paired
    t and Wilcoxon p-values, and McNemar's exact test pooled over the seeds' test predictions
    (``test_correct``) when both arms stored them (:mod:`bissl.stats`)."""
    from bissl.report_tables import compare_arms

    c = compare_arms(per_seed, "bissl", "baseline")
    if c is None:
        raise ValueError("paired_statistics: no seed has both arms")
    return {"test_acc": c.stats.to_dict(), "mcnemar": c.mcnemar.to_dict() if c.mcnemar else None}


def write_json_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of test accuracy (%) per seed and mean ± std, baseline vs BiSSL."""
    per_seed, summary = results["per_seed"], results["summary"]
    has_base = "baseline" in summary
    head = f"{'seed':>10}  {'baseline':>14}  {'BiSSL':>14}  {'BiSSL - baseline':>17}"
    lines = [head, "-" * len(head)]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    for seed, arms in per_seed.items():
        base = arms.get("baseline")
        b = base["test_acc"] if base else None
        s = arms["bissl"]["test_acc"]
        diff = f"{100 * (s - b):+.2f}" if b is not None else "—"
        lines.append(f"{seed:>10}  {pct(b):>14}  {pct(s):>14}  {diff:>17}")

    def ms(stats: dict[str, float]) -> str:
        return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"

    base_ms = ms(summary["baseline"]["test_acc"]) if has_base else "—"
    diff_ms = (
        (
            f"{100 * summary['bissl_minus_baseline_test_acc']['mean']:+.2f} ± "
            f"{100 * summary['bissl_minus_baseline_test_acc']['std']:.2f}"
        )
        if has_base
        else "—"
    )
    lines.append("-" * len(head))
    lines.append(f"{'mean ± std':>10}  {base_ms:>14}  {ms(summary['bissl']['test_acc']):>14}  {diff_ms:>17}")
    paired = summary.get("bissl_vs_baseline")
    if paired:
        t = paired["test_acc"]

        def p(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3g}"

        lines.append(
            f"BiSSL − baseline over {t['n']} seeds: {100 * t['mean']:+.2f} points, "
            f"{100 * t['level']:.0f}% bootstrap interval [{100 * t['ci_low']:+.2f}, "
            f"{100 * t['ci_high']:+.2f}]; paired t p = {p(t['p_t'])}, Wilcoxon p = "
            f"{p(t['p_wilcoxon'])}"
        )
        m = paired["mcnemar"]
        if m:
            lines.append(
                f"McNemar (test examples pooled over seeds): only BiSSL right {m['only_a']}, "
                f"only baseline right {m['only_b']}, exact p = {p(m['p'])}"
            )
    return "\n".join(lines)
