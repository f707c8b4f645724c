"""Results tables generated from shipped run data: ``bissl report`` and ``make tables``.

Every results table in the README and ``docs/`` is produced here from a run directory's
``results.json`` (``bissl run``) or a sweep directory's ``sweep.csv`` (``bissl sweep``), committed
under ``docs/``; no number is typed by hand. A table sits between marker comments in the markdown::

    <!-- table:run runs/demo_digits per_seed=yes -->
    ... generated, rewritten by `make tables` ...
    <!-- /table -->

The marker names the kind (``run`` or ``sweep``), the directory (relative to the markdown file,
like a link) and options: ``metric=`` (``test_acc`` default, ``val_acc``, ``test_loss``,
``val_loss``), ``per_seed=yes`` (run tables: one row per seed), ``compare=`` (comma-separated
``a-b`` arm pairs; default: ``bissl`` against every other arm), ``diagnostics=yes`` (sweep
tables: the BiSSL stage's diagnostics per cell, from ``summary.csv``). ``bissl report --update FILE...``
rewrites exactly those blocks; ``--check`` reports blocks that differ (a test runs it on the
README and every doc).

What a table states:

* per arm: mean ± sample std over seeds (ddof 1), accuracies in percent;
* per comparison ``a − b`` (paired by seed, :mod:`bissl.stats`): the mean difference, its 95%
  percentile bootstrap interval (10,000 resamples, seed 0), the two-sided paired t-test and
  Wilcoxon signed-rank p-values, and McNemar's exact test pooled over seeds when every seed of
  both arms stores per-example test correctness (``test_correct``: one 0/1 per test example, in
  test-split order, in the arm's ``per_seed`` entry);
* sweeps: the same per cell, plus Holm-adjusted p-values across the cells of the table (one
  family per comparison and test);
* where the numbers come from: the data file, and the machine, commit and date of the run
  (:mod:`bissl.provenance`; "not recorded" for runs made before it was).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bissl.provenance import read_provenance
from bissl.stats import BOOTSTRAP_RESAMPLES, compare_paired, holm, mcnemar_pooled

#: Arms in display order, with their display names; other arms follow alphabetically.
ARM_NAMES = {
    "majority": "majority class (training split)",
    "bag_of_tokens": "bag-of-tokens logistic regression",
    "baseline": "baseline",
    "baseline_matched": "compute-matched baseline",
    "bissl_upper0": "BiSSL, no upper step",
    "bissl": "BiSSL",
}
METRIC_NAMES = {
    "test_acc": "test top-1 accuracy (%)",
    "val_acc": "validation top-1 accuracy (%)",
    "test_loss": "test cross-entropy",
    "val_loss": "validation cross-entropy",
}
#: Entries of a seed's results that are not arms (the BiSSL stage's diagnostics, a k-fold seed's split).
NOT_ARMS = ("diagnostics", "split")
#: Per-example correctness of an arm on the test split (optional; enables McNemar).
CORRECT_KEY = "test_correct"
OPTIONS = ("metric", "per_seed", "compare", "diagnostics")
#: summary.csv's BiSSL-stage diagnostic columns a sweep table can add (``diagnostics=yes``).
DIAGNOSTIC_COLUMNS = {
    "diag_distance_final": ("‖θ − φ‖ (last lower step)", ".3g"),
    "diag_prox_share_final": ("proximal share (last stage)", ".3f"),
    "diag_hg_cos_exact_mean": ("cosine to exact solve", ".4f"),
    "diag_hg_cos_exact_min": ("each seed's worst stage", ".4f"),
}
_START = re.compile(r"^<!-- table:(?P<kind>\S+) (?P<path>\S+)(?P<opts>(?: \S+=\S+)*) -->$")
_END = "<!-- /table -->"


class TableError(ValueError):
    """A marker, run directory or data file that cannot make a table (the message says which)."""


# --------------------------------------------------------------------------- number formats
def _is_acc(metric: str) -> bool:
    return metric.endswith("_acc")


def _value(v: float, metric: str) -> str:
    return f"{100 * v:.2f}" if _is_acc(metric) else f"{v:.4f}"


def _diff(v: float, metric: str) -> str:
    return f"{100 * v:+.2f}" if _is_acc(metric) else f"{v:+.4f}"


def _mean_std(values: Sequence[float], metric: str) -> str:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return f"{_value(mean, metric)} ± {_value(std, metric) if n > 1 else '—'}"


def _p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _arm_order(arms: Sequence[str]) -> list[str]:
    known = [a for a in ARM_NAMES if a in arms]
    return known + sorted(a for a in arms if a not in ARM_NAMES)


def _arm_name(arm: str) -> str:
    return ARM_NAMES.get(arm, arm)


def _seeds_text(seeds: Iterable[int]) -> str:
    s = sorted(seeds)
    if s and s == list(range(s[0], s[0] + len(s))) and len(s) > 2:
        return f"seeds {s[0]}–{s[-1]} ({len(s)})"
    return f"seed{'s' if len(s) != 1 else ''} {', '.join(map(str, s))}"


def _provenance_text(prov: dict[str, Any] | None) -> str:
    if not prov:
        return "machine, commit and date: not recorded"
    return (
        f"run on {prov.get('machine') or 'an unrecorded machine'}, commit "
        f"`{prov.get('commit') or 'unrecorded'}`, {prov.get('date') or 'undated'}"
    )


def _wall_text(results: dict[str, Any]) -> str:
    """The run's wall time as ``bissl run`` recorded it (that of the last process, if resumed)."""
    wall = results.get("wall_s_this_process")
    if wall is None:
        return ""
    how = ", ".join(
        f"{results[k]} {name}"
        for k, name in (("workers", "worker process(es)"), ("threads", "thread(s) each"))
        if k in results
    )
    return f"; wall time {wall:.0f} s{f' ({how})' if how else ''}"


def _split_text(results: dict[str, Any]) -> str:
    """How a k-fold run's seeds split the data (empty for a fixed split)."""
    found = [e.get("split") for e in results["per_seed"].values() if isinstance(e, dict)]
    splits: list[dict[str, Any]] = [sp for sp in found if isinstance(sp, dict)]
    if not splits or len(splits) < len(found):
        return ""
    folds = {sp["folds"] for sp in splits}
    repeats = sorted({sp["split_seed"] for sp in splits})
    per_repeat = {r: sorted(sp["fold"] for sp in splits if sp["split_seed"] == r) for r in repeats}
    k = folds.pop() if len(folds) == 1 else None
    if k is None:
        return " Seeds use different numbers of folds."
    complete = [r for r in repeats if per_repeat[r] == list(range(k))]
    texts = sum(sp["test_n"] for sp in splits if sp["split_seed"] == complete[0]) if complete else None
    covered = f"; {len(complete)} complete repeat(s), each testing all {texts} labelled texts once" if complete else ""
    return (
        f" Stratified {k}-fold, repeated with split seed(s) {', '.join(map(str, repeats))}: each seed trains "
        f"on its own split and is tested on its fold ({min(sp['test_n'] for sp in splits)}–"
        f"{max(sp['test_n'] for sp in splits)} texts){covered}; paired statistics pair the arms per seed, "
        "McNemar pools every seed's test texts."
    )


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return [_row(header), _row(align), *(_row(r) for r in rows)]


# --------------------------------------------------------------------------- paired statistics
@dataclass
class ArmComparison:
    """Paired statistics of ``a − b`` over the seeds both arms finished."""

    a: str
    b: str
    seeds: list[int]
    stats: Any  # bissl.stats.PairedComparison
    mcnemar: Any = None  # bissl.stats.McNemarResult (pooled) or None
    mcnemar_per_seed: dict[int, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{_arm_name(self.a)} − {_arm_name(self.b)}"


def compare_arms(
    per_seed: dict[int, dict[str, dict[str, Any]]], a: str, b: str, metric: str = "test_acc"
) -> ArmComparison | None:
    """Paired comparison ``a − b`` of ``metric`` from ``{seed: {arm: metrics}}``; None when no
    seed has both arms. McNemar (pooled and per seed) is added when every paired seed stores
    ``test_correct`` for both arms.

    Raises:
        TableError: per-example correctness of different lengths within a seed.
    """
    seeds = sorted(s for s, arms in per_seed.items() if arms.get(a) and arms.get(b))
    if not seeds:
        return None
    stats = compare_paired([per_seed[s][a][metric] for s in seeds], [per_seed[s][b][metric] for s in seeds])
    out = ArmComparison(a, b, seeds, stats)
    if all(CORRECT_KEY in per_seed[s][a] and CORRECT_KEY in per_seed[s][b] for s in seeds):
        pairs = [(per_seed[s][a][CORRECT_KEY], per_seed[s][b][CORRECT_KEY]) for s in seeds]
        try:
            out.mcnemar = mcnemar_pooled(pairs)
            out.mcnemar_per_seed = {s: mcnemar_pooled([p]) for s, p in zip(seeds, pairs)}
        except ValueError as err:
            raise TableError(f"{CORRECT_KEY} of {a} and {b}: {err}") from None
    return out


def _pairs(arms: Sequence[str], compare: str | None) -> list[tuple[str, str]]:
    if compare:
        pairs = []
        for item in compare.split(","):
            a, sep, b = item.partition("-")
            if not sep or not a or not b:
                raise TableError(f"compare={compare!r}: each pair must look like 'bissl-baseline'")
            pairs.append((a, b))
        return pairs
    if "bissl" not in arms:
        return []
    return [("bissl", other) for other in _arm_order(arms) if other != "bissl"]


def _comparison_row(c: ArmComparison, metric: str) -> list[str]:
    s = c.stats
    ci = "—" if math.isnan(s.ci_low) else f"[{_diff(s.ci_low, metric)}, {_diff(s.ci_high, metric)}]"
    mc = "—" if c.mcnemar is None else (f"{_p(c.mcnemar.p)} ({c.mcnemar.only_a}/{c.mcnemar.only_b})")
    return [c.label, _diff(s.mean, metric), ci, _p(s.p_t), _p(s.p_wilcoxon), mc, str(s.n)]


_COMPARISON_HEADER = [
    "comparison",
    "mean difference",
    "95% CI (bootstrap)",
    "p (paired t)",
    "p (Wilcoxon)",
    "p (McNemar, pooled; discordant a/b)",
    "seeds",
]


def _footnote(metric: str) -> str:
    unit = "percentage points" if _is_acc(metric) else "the metric's units"
    return (
        f"Mean ± sample std over seeds. Differences are paired by seed, in {unit}; CI: "
        f"percentile bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES:,} resamples, "
        "seed 0); p-values two-sided; — where undefined (one seed, equal differences, no "
        "per-example predictions)."
    )


# --------------------------------------------------------------------------- run tables
def _read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise TableError(f"{run_dir}: no results.json (not a finished run directory)")
    try:
        results = json.loads(path.read_text())
        results["per_seed"].items()
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise TableError(f"{path}: not a results.json of bissl run ({err})") from None
    return results


def _check_metric(metric: str) -> None:
    if metric not in METRIC_NAMES:
        raise TableError(f"metric={metric!r}; valid metrics: {', '.join(METRIC_NAMES)}")


def render_run_table(
    run_dir: str | Path,
    *,
    label: str | None = None,
    metric: str = "test_acc",
    show_seeds: bool = False,
    compare: str | None = None,
) -> str:
    """Markdown table(s) of one run directory's ``results.json`` (see the module docstring).

    Args:
        run_dir: the run directory.
        label: how the source is named in the text (default: ``run_dir`` as given).
        metric: the metric tabulated.
        show_seeds: add a table with one row per seed (and per-seed McNemar p-values when the
            per-example predictions are stored).
        compare: ``"a-b,c-d"`` arm pairs (default: ``bissl`` against every other arm).

    Raises:
        TableError: no or malformed results.json, unknown metric or arm.
    """
    _check_metric(metric)
    run_dir = Path(run_dir)
    results = _read_results(run_dir)
    try:
        per_seed = {
            int(s): {arm: m for arm, m in arms.items() if m and arm not in NOT_ARMS}
            for s, arms in results["per_seed"].items()
        }
    except (AttributeError, ValueError) as err:
        raise TableError(f"{run_dir}/results.json: malformed per_seed ({err})") from None
    arms = _arm_order(sorted({a for entry in per_seed.values() for a in entry}))
    missing = [a for a in arms for entry in per_seed.values() if a in entry and metric not in entry[a]]
    if missing:
        raise TableError(f"{run_dir}/results.json: arm {missing[0]!r} has no {metric!r}")
    pairs = _pairs(arms, compare)
    for arm in {x for pair in pairs for x in pair}:
        if arm not in arms:
            raise TableError(f"compare: arm {arm!r} is not in {run_dir}/results.json (arms: {', '.join(arms)})")
    source = label if label is not None else str(run_dir)
    what = ", ".join(f"`{results[k]}`" for k in ("dataset", "backbone", "pretext") if k in results)
    title = METRIC_NAMES[metric]
    lines = [
        f"{title[0].upper()}{title[1:]}{f' on {what}' if what else ''}, "
        f"{_seeds_text(per_seed)}; {_provenance_text(read_provenance(run_dir, results))}"
        f"{_wall_text(results)}. Data: `{source}/results.json`.{_split_text(results)}",
        "",
    ]
    arm_rows = []
    for arm in arms:
        values = [per_seed[s][arm][metric] for s in sorted(per_seed) if arm in per_seed[s]]
        arm_rows.append(
            [
                _arm_name(arm),
                _mean_std(values, metric),
                f"{_value(min(values), metric)} – {_value(max(values), metric)}",
                str(len(values)),
            ]
        )
    lines += _table(["arm", "mean ± std", "min – max", "seeds"], arm_rows)
    comparisons = [c for c in (compare_arms(per_seed, a, b, metric) for a, b in pairs) if c]
    if comparisons:
        rows = [_comparison_row(c, metric) for c in comparisons]
        lines += ["", *_table(_COMPARISON_HEADER, rows)]
    if show_seeds:
        header = ["seed", *(_arm_name(a) for a in arms), *(c.label for c in comparisons)]
        with_mc = [c for c in comparisons if c.mcnemar is not None]
        header += [f"McNemar p, {c.label}" for c in with_mc]
        rows = []
        for seed in sorted(per_seed):
            entry = per_seed[seed]
            row = [str(seed)] + [_value(entry[a][metric], metric) if a in entry else "—" for a in arms]
            row += [
                _diff(entry[c.a][metric] - entry[c.b][metric], metric) if seed in c.seeds else "—" for c in comparisons
            ]
            row += [_p(c.mcnemar_per_seed[seed].p) if seed in c.mcnemar_per_seed else "—" for c in with_mc]
            rows.append(row)
        lines += ["", *_table(header, rows)]
    lines += ["", _footnote(metric)]
    diagnostics = _diagnostics_text(results.get("summary", {}).get("diagnostics"))
    if diagnostics:
        lines += ["", diagnostics]
    return "\n".join(lines)


def _diagnostics_text(diag: dict[str, Any] | None) -> str:
    """One sentence on what the BiSSL stage did (means over seeds of ``bissl_diagnostics``)."""
    if not diag:
        return ""

    def mean(key: str, fmt: str) -> str | None:
        entry = diag.get(key)
        return None if not entry else format(entry["mean"], fmt)

    parts = [
        f"‖θ − φ‖ at the last lower step {v}" if (v := mean("distance_final", ".3g")) else None,
        f"proximal share of the lower gradient in the last stage {v}"
        if (v := mean("prox_share_final", ".2f"))
        else None,
        f"cosine of the hypergradient to a many-iteration MINRES solve {v} (each seed's worst stage: {w})"
        if (v := mean("hg_cos_exact_mean", ".4f")) and (w := mean("hg_cos_exact_min", ".4f"))
        else None,
        f"upper steps skipped {v}" if (v := mean("skipped", ".3g")) else None,
    ]
    text = "; ".join(p for p in parts if p)
    return f"BiSSL stage, mean over seeds: {text}." if text else ""


# --------------------------------------------------------------------------- sweep tables
def _read_sweep_csv(sweep_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = sweep_dir / "sweep.csv"
    if not path.is_file():
        raise TableError(f"{sweep_dir}: no sweep.csv (not a collected sweep directory)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    needed = ("cell", "seed", "arm")
    if not all(c in columns for c in needed) or columns.index("seed") < columns.index("cell"):
        raise TableError(
            f"{path}: expected the columns cell, <swept keys>, seed, arm, metrics (bissl sweep's format), got {columns}"
        )
    grid = columns[columns.index("cell") + 1 : columns.index("seed")]
    return grid, rows


def render_sweep_table(
    sweep_dir: str | Path,
    *,
    label: str | None = None,
    metric: str = "test_acc",
    compare: str | None = None,
    diagnostics: bool = False,
) -> str:
    """Markdown table of a sweep directory's ``sweep.csv``: one row per cell (module docstring).

    Holm's adjustment runs over the cells of the table, separately for each comparison and test.
    ``diagnostics`` adds a table of the BiSSL stage's diagnostics per cell (means over seeds, from
    ``summary.csv``'s ``diag_*`` columns).

    Raises:
        TableError: no or malformed sweep.csv, unknown metric or arm; no diagnostics in
            summary.csv when asked for them.
    """
    _check_metric(metric)
    sweep_dir = Path(sweep_dir)
    grid, rows = _read_sweep_csv(sweep_dir)
    cells: dict[str, dict[str, Any]] = {}
    try:
        for r in rows:
            cell = cells.setdefault(r["cell"], {"values": [r[k] for k in grid], "per_seed": {}})
            if r.get(metric, "") == "":
                raise TableError(
                    f"{sweep_dir}/sweep.csv: cell {r['cell']} seed {r['seed']} arm {r['arm']} has no {metric}"
                )
            cell["per_seed"].setdefault(int(r["seed"]), {})[r["arm"]] = {metric: float(r[metric])}
    except (KeyError, ValueError) as err:
        if isinstance(err, TableError):
            raise
        raise TableError(f"{sweep_dir}/sweep.csv: malformed row ({err})") from None
    arms = _arm_order(sorted({a for c in cells.values() for s in c["per_seed"].values() for a in s}))
    pairs = _pairs(arms, compare)
    for arm in {x for pair in pairs for x in pair}:
        if arm not in arms:
            raise TableError(f"compare: arm {arm!r} is not in {sweep_dir}/sweep.csv (arms: {', '.join(arms)})")
    comps = {name: [compare_arms(c["per_seed"], a, b, metric) for a, b in pairs] for name, c in cells.items()}
    holm_t, holm_w = [], []
    for k in range(len(pairs)):
        ps = [comps[name][k] for name in cells]
        holm_t.append(holm([c.stats.p_t if c else None for c in ps]))
        holm_w.append(holm([c.stats.p_wilcoxon if c else None for c in ps]))
    header = [*grid, *(_arm_name(a) for a in arms)]
    for a, b in pairs:
        d = f"{_arm_name(a)} − {_arm_name(b)}"
        header += [d, "95% CI", "p (t)", "p (t), Holm", "p (Wilcoxon)", "p (W), Holm"]
    header.append("seeds")
    table_rows = []
    for i, (name, cell) in enumerate(cells.items()):
        per_seed = cell["per_seed"]
        row = list(cell["values"])
        for arm in arms:
            values = [per_seed[s][arm][metric] for s in sorted(per_seed) if arm in per_seed[s]]
            row.append(_mean_std(values, metric) if values else "—")
        for k, c in enumerate(comps[name]):
            if c is None:
                row += ["—"] * 6
                continue
            st = c.stats
            ci = "—" if math.isnan(st.ci_low) else f"[{_diff(st.ci_low, metric)}, {_diff(st.ci_high, metric)}]"
            row += [_diff(st.mean, metric), ci, _p(st.p_t), _p(holm_t[k][i]), _p(st.p_wilcoxon), _p(holm_w[k][i])]
        row.append(str(len(per_seed)))
        table_rows.append(row)
    source = label if label is not None else str(sweep_dir)
    seeds = sorted({s for c in cells.values() for s in c["per_seed"]})
    title = METRIC_NAMES[metric]
    lines = [
        f"{title[0].upper()}{title[1:]} per cell, {len(cells)} cells, {_seeds_text(seeds)}; "
        f"{_provenance_text(read_provenance(sweep_dir))}. Data: `{source}/sweep.csv`.",
        "",
    ]
    lines += _table(header, table_rows, right_from=len(grid))
    lines += ["", _footnote(metric) + " Holm: over the cells of this table, per comparison and test."]
    if diagnostics:
        lines += ["", *_diagnostics_table(sweep_dir, grid, list(cells))]
    return "\n".join(lines)


def _diagnostics_table(sweep_dir: Path, grid: list[str], cells: list[str]) -> list[str]:
    path = sweep_dir / "summary.csv"
    rows = {}
    if path.is_file():
        with open(path, newline="") as f:
            rows = {r["cell"]: r for r in csv.DictReader(f)}
    if not all(c in rows and rows[c].get("diag_distance_final") for c in cells):
        raise TableError(f"{path}: diagnostics=yes, but not every cell has the BiSSL stage's diagnostics")
    body = []
    for c in cells:
        r = rows[c]
        body.append(
            [r[k] for k in grid]
            + ["—" if not r.get(col) else format(float(r[col]), fmt) for col, (_, fmt) in DIAGNOSTIC_COLUMNS.items()]
        )
    return [
        "BiSSL stage per cell, means over seeds (`summary.csv`): ‖θ − φ‖ at the last lower step, the "
        "proximal term's share of the lower gradient over the last stage, and the hypergradient's "
        "cosine to a many-iteration MINRES solve of the same system (once per stage).",
        "",
        *_table([*grid, *(name for name, _ in DIAGNOSTIC_COLUMNS.values())], body, right_from=len(grid)),
    ]


# --------------------------------------------------------------------------- markers
def render(kind: str, path: str | Path, *, label: str | None = None, options: dict[str, str] | None = None) -> str:
    """The table of ``kind`` (``run`` | ``sweep``) for ``path`` with marker ``options``.

    Raises:
        TableError: unknown kind or option, or what the renderers raise.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TableError(f"unknown table option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    metric = options.get("metric", "test_acc")
    compare = options.get("compare")
    for key in ("per_seed", "diagnostics"):
        if options.get(key, "no") not in ("yes", "no"):
            raise TableError(f"{key}={options[key]!r}; use yes or no")
    if kind == "run":
        if "diagnostics" in options:
            raise TableError("diagnostics is an option of sweep tables (run tables always state them)")
        flag = options.get("per_seed", "no")
        if flag not in ("yes", "no"):
            raise TableError(f"per_seed={flag!r}; use yes or no")
        return render_run_table(path, label=label, metric=metric, show_seeds=flag == "yes", compare=compare)
    if kind == "sweep":
        if "per_seed" in options:
            raise TableError("per_seed is an option of run tables")
        return render_sweep_table(
            path, label=label, metric=metric, compare=compare, diagnostics=options.get("diagnostics") == "yes"
        )
    raise TableError(f"unknown table kind {kind!r}; use 'run' or 'sweep'")


def kind_of(path: str | Path) -> str:
    """``sweep`` for a directory with sweep.csv, ``run`` for one with results.json."""
    path = Path(path)
    if (path / "sweep.csv").is_file():
        return "sweep"
    if (path / "results.json").is_file():
        return "run"
    raise TableError(f"{path}: neither results.json (a run) nor sweep.csv (a sweep)")


@dataclass
class Block:
    """One marked table in a markdown text: lines ``start`` (the marker) to ``end`` (``/table``)."""

    kind: str
    path: str
    options: dict[str, str]
    start: int
    end: int


def find_blocks(text: str, where: str = "markdown") -> list[Block]:
    """The marked tables of a markdown text, in order.

    Raises:
        TableError: a start marker without its end, an end without a start, nested markers, or a
            malformed option (the message names ``where`` and the line).
    """
    blocks, open_block = [], None
    for i, line in enumerate(text.split("\n")):
        stripped = line.strip()
        if stripped.startswith("<!-- table:"):
            m = _START.match(stripped)
            if m is None:
                raise TableError(
                    f"{where}:{i + 1}: malformed marker {stripped!r}; expected "
                    "'<!-- table:KIND PATH [key=value ...] -->'"
                )
            if open_block is not None:
                raise TableError(
                    f"{where}:{i + 1}: table marker inside the block opened at line {open_block.start + 1}"
                )
            opts = dict(o.split("=", 1) for o in m.group("opts").split())
            open_block = Block(m.group("kind"), m.group("path"), opts, i, -1)
        elif stripped == _END:
            if open_block is None:
                raise TableError(f"{where}:{i + 1}: '{_END}' without a table marker")
            open_block.end = i
            blocks.append(open_block)
            open_block = None
    if open_block is not None:
        raise TableError(f"{where}:{open_block.start + 1}: table marker without '{_END}'")
    return blocks


def regenerate(text: str, base_dir: str | Path, where: str = "markdown") -> str:
    """``text`` with every marked block's content replaced by its generated table.

    Paths in markers are relative to ``base_dir`` (the markdown file's folder). Lines outside the
    blocks, and the markers themselves, are kept byte for byte.
    """
    lines = text.split("\n")
    out, pos = [], 0
    for b in find_blocks(text, where):
        try:
            table = render(b.kind, Path(base_dir) / b.path, label=b.path, options=b.options)
        except TableError as err:
            raise TableError(f"{where}:{b.start + 1}: {err}") from None
        out += [*lines[pos : b.start + 1], "", *table.split("\n"), ""]
        pos = b.end
    out += lines[pos:]
    return "\n".join(out)


def check_files(paths: Sequence[str | Path]) -> list[str]:
    """Names of the files whose marked tables differ from what :func:`regenerate` writes."""
    stale = []
    for path in map(Path, paths):
        text = path.read_text()
        if regenerate(text, path.parent, str(path)) != text:
            stale.append(str(path))
    return stale


def update_files(paths: Sequence[str | Path]) -> list[str]:
    """Rewrite the marked tables of each file; returns the files that changed."""
    changed = []
    for path in map(Path, paths):
        text = path.read_text()
        new = regenerate(text, path.parent, str(path))
        if new != text:
            path.write_text(new)
            changed.append(str(path))
    return changed


def count_blocks(paths: Sequence[str | Path]) -> int:
    return sum(len(find_blocks(Path(p).read_text(), str(p))) for p in paths)
