"""``results.json`` (per-seed and mean ± std accuracies of every arm, paired statistics of BiSSL
against each other arm, BiSSL-stage diagnostics) and the printed table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Every arm a run can have, in display order: a text run's probes (``text.probes``: the
#: training majority class, a bag-of-tokens logistic regression), the baseline, the
#: compute-matched baseline (``baseline.compute_matched``), BiSSL without upper steps
#: (``baseline.ablation_upper0``), BiSSL.
ARMS = ("majority", "bag_of_tokens", "baseline", "baseline_matched", "bissl_upper0", "bissl")
_ARM_TITLES = {
    "majority": "majority",
    "bag_of_tokens": "bag of tokens",
    "baseline": "baseline",
    "baseline_matched": "matched",
    "bissl_upper0": "no upper",
    "bissl": "BiSSL",
}
#: The per-arm final metrics of a run (results.json, sweeps).
METRICS = ("test_acc", "val_acc", "test_loss", "val_loss")


def configured_arms(cfg: Any) -> tuple[str, ...]:
    """The arms a run of ``cfg`` (a :class:`bissl.config.Config`) produces, in :data:`ARMS` order."""
    b = cfg.baseline
    probes = cfg.task == "text" and cfg.text.probes
    on = {
        "majority": probes,
        "bag_of_tokens": probes,
        "baseline": b.enabled,
        "baseline_matched": b.enabled and b.compute_matched,
        "bissl_upper0": b.enabled and b.ablation_upper0,
        "bissl": True,
    }
    return tuple(a for a in ARMS if on[a])


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize(
    per_seed: dict[int, dict[str, dict[str, float] | None]], *, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Aggregate per-seed results of every arm.

    Args:
        per_seed: ``{seed: {"bissl": {...metrics}, "baseline": {...} or None, ...}}`` (any of
            :data:`ARMS`; a ``"diagnostics"`` entry is averaged into ``summary["diagnostics"]``).
        meta: extra fields stored as they are (dataset, backbone, wall time...).

    ``summary`` holds, per arm that every seed has, mean ± std of :data:`METRICS`; per other arm
    ``bissl_minus_<arm>_test_acc`` (mean ± std of the paired differences) and, with two or more
    seeds, ``bissl_vs_<arm>`` (:func:`paired_statistics`).
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
    if "bissl" in by_arm:
        for arm in by_arm:
            if arm == "bissl":
                continue
            diffs = [b["test_acc"] - a["test_acc"] for b, a in zip(by_arm["bissl"], by_arm[arm])]
            summary[f"bissl_minus_{arm}_test_acc"] = mean_std(diffs)
            if len(seeds) >= 2:
                summary[f"bissl_vs_{arm}"] = paired_statistics(per_seed, arm)
    diags = [d for d in (per_seed[s].get("diagnostics") for s in seeds) if d is not None]
    if diags and len(diags) == len(seeds):
        summary["diagnostics"] = {
            k: mean_std([float(d[k]) for d in diags]) for k in diags[0] if all(d.get(k) is not None for d in diags)
        }
    return {
        "seeds": seeds,
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "summary": summary,
        "notes": "accuracies are top-1 fractions in [0, 1]; std is the sample standard deviation "
        "over seeds (ddof=1); test accuracy is of the final fine-tuning epoch (the test "
        "split is never used for selection)",
        **(meta or {}),
    }


def paired_statistics(per_seed: dict[int, dict[str, Any]], other: str = "baseline") -> dict[str, Any]:
    """BiSSL − ``other`` test accuracy over the seeds, paired: mean, 95% bootstrap interval, paired
    t and Wilcoxon p-values, and McNemar's exact test pooled over the seeds' test predictions
    (``test_correct``) when both arms stored them (:mod:`bissl.stats`)."""
    from bissl.report_tables import compare_arms

    c = compare_arms(per_seed, "bissl", other)
    if c is None:
        raise ValueError(f"paired_statistics: no seed has both 'bissl' and {other!r}")
    return {"test_acc": c.stats.to_dict(), "mcnemar": c.mcnemar.to_dict() if c.mcnemar else None}


def write_json_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


#: Keys of :func:`bissl_diagnostics` (per seed; averaged in ``summary["diagnostics"]``).
DIAGNOSTICS = ("distance_final", "prox_share_final", "hg_cos_exact_mean", "hg_cos_exact_min", "skipped")


def bissl_diagnostics(metrics_csv: str | Path) -> dict[str, float | None] | None:
    """What the BiSSL stage did to θ and φ, from a seed's ``metrics.csv`` (None if it is missing).

    Returns ``distance_final`` (‖θ − φ‖ at the last lower step), ``prox_share_final`` (mean
    proximal share of the lower gradient over the last stage's lower steps), ``hg_cos_exact_mean``
    and ``hg_cos_exact_min`` (over the stages checked against an exact solve; None when
    ``bissl.exact_check_iters`` is 0) and ``skipped`` (upper steps skipped).
    """
    from bissl.trainer.metrics import read_metrics

    path = Path(metrics_csv)
    if not path.exists():
        return None
    rows = [r for r in read_metrics(path) if r["phase"] == "bissl"]
    lower = [r for r in rows if r["part"] == "lower"]
    last_round = lower[-1]["round"] if lower else None
    shares = [r["prox_share"] for r in lower if r["round"] == last_round and r.get("prox_share") is not None]
    cos = [r["hg_cos_exact"] for r in rows if r["part"] == "upper" and r.get("hg_cos_exact") is not None]
    return {
        "distance_final": lower[-1]["distance"] if lower else None,
        "prox_share_final": sum(shares) / len(shares) if shares else None,
        "hg_cos_exact_mean": sum(cos) / len(cos) if cos else None,
        "hg_cos_exact_min": min(cos) if cos else None,
        "skipped": float(sum(r.get("skipped") or 0 for r in rows if r["part"] == "upper")),
    }


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of test accuracy (%) per seed and mean ± std for every arm, BiSSL − baseline
    per seed, then BiSSL's paired statistics against each other arm."""
    per_seed, summary = results["per_seed"], results["summary"]
    arms = [a for a in ARMS if a in ("baseline", "bissl") or any(r.get(a) for r in per_seed.values())]
    head = "  ".join([f"{'seed':>10}", *(f"{_ARM_TITLES[a]:>14}" for a in arms), f"{'BiSSL - baseline':>17}"])
    lines = [head, "-" * len(head)]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    def acc(arm_result: dict[str, Any] | None) -> float | None:
        return arm_result["test_acc"] if arm_result else None

    for seed, by_arm in per_seed.items():
        b, s = acc(by_arm.get("baseline")), acc(by_arm["bissl"])
        diff = f"{100 * (s - b):+.2f}" if b is not None and s is not None else "—"
        lines.append("  ".join([f"{seed:>10}", *(f"{pct(acc(by_arm.get(a))):>14}" for a in arms), f"{diff:>17}"]))

    def ms(stats: dict[str, float] | None, sign: str = "") -> str:
        return "—" if stats is None else f"{100 * stats['mean']:{sign}.2f} ± {100 * stats['std']:.2f}"

    means = [ms(summary[a]["test_acc"]) if a in summary else "—" for a in arms]
    diff_ms = ms(summary.get("bissl_minus_baseline_test_acc"), "+")
    lines.append("-" * len(head))
    lines.append("  ".join([f"{'mean ± std':>10}", *(f"{m:>14}" for m in means), f"{diff_ms:>17}"]))

    def p(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3g}"

    for other in arms:
        paired = summary.get(f"bissl_vs_{other}")
        if not paired:
            continue
        t, name = paired["test_acc"], _ARM_TITLES[other]
        lines.append(
            f"BiSSL − {name} over {t['n']} seeds: {100 * t['mean']:+.2f} points, "
            f"{100 * t['level']:.0f}% bootstrap interval [{100 * t['ci_low']:+.2f}, "
            f"{100 * t['ci_high']:+.2f}]; paired t p = {p(t['p_t'])}, Wilcoxon p = "
            f"{p(t['p_wilcoxon'])}"
        )
        m = paired["mcnemar"]
        if m:
            lines.append(
                f"  McNemar (test examples pooled over seeds): only BiSSL right {m['only_a']}, "
                f"only {name} right {m['only_b']}, exact p = {p(m['p'])}"
            )
    diag = summary.get("diagnostics")
    if diag:
        parts = []
        if "distance_final" in diag:
            parts.append(f"‖θ − φ‖ at the end {diag['distance_final']['mean']:.3g}")
        if "prox_share_final" in diag:
            parts.append(f"proximal share of the lower gradient {100 * diag['prox_share_final']['mean']:.1f}%")
        if "hg_cos_exact_mean" in diag:
            parts.append(
                f"hypergradient cosine to an exact solve {diag['hg_cos_exact_mean']['mean']:.4f} "
                f"(lowest {diag['hg_cos_exact_min']['mean']:.4f})"
            )
        if parts:
            lines.append("BiSSL stage (mean over seeds): " + "; ".join(parts))
    return "\n".join(lines)
