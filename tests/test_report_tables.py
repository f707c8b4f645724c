"""bissl report / make tables: tables from results.json and sweep.csv in the formats bissl run and
bissl sweep write, marker blocks rewritten exactly, and the docs' tables equal to their data."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bissl.cli import main
from bissl.provenance import write_provenance
from bissl.report_tables import (
    TableError,
    check_files,
    find_blocks,
    regenerate,
    render_run_table,
    render_sweep_table,
    update_files,
)
from bissl.stats import compare_paired, holm, mcnemar_pooled
from bissl.sweep.collect import write_csv
from bissl.trainer.report import METRICS, summarize, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
BASE = [0.9610, 0.9666, 0.9582, 0.9638]
BISSL = [0.9638, 0.9694, 0.9582, 0.9694]


def _metrics(acc: float, **extra) -> dict:
    return {"test_acc": acc, "val_acc": acc - 0.01, "test_loss": 1 - acc, "val_loss": 1.1 - acc, **extra}


def _run_dir(tmp_path: Path, name: str = "run", correct: bool = False) -> Path:
    per_seed = {}
    for s, (b, x) in enumerate(zip(BASE, BISSL)):
        extra_b = {"test_correct": [1] * 5 + [0] * 2 + [s % 2]} if correct else {}
        extra_x = {"test_correct": [1] * 5 + [1, 0] + [1]} if correct else {}
        per_seed[s] = {"baseline": _metrics(b, **extra_b), "bissl": _metrics(x, **extra_x)}
    run = tmp_path / name
    run.mkdir()
    write_json_atomic(
        summarize(per_seed, meta={"dataset": "digits", "backbone": "small_cnn", "pretext": "simclr"}),
        run / "results.json",
    )
    return run


def _sweep_dir(tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    out.mkdir()
    rows = []
    for cell, lam, shift in (("lam=0.001", 0.001, 0.0), ("lam=0.01", 0.01, 0.004), ("lam=0.1", 0.1, -0.003)):
        for seed in range(4):
            for arm, acc in (("bissl", BISSL[seed] + shift * (seed + 1)), ("baseline", BASE[seed])):
                rows.append(
                    {
                        "cell": cell,
                        "lam": lam,
                        "seed": seed,
                        "arm": arm,
                        **{m: _metrics(acc)[m] for m in METRICS},
                        "source": cell,
                    }
                )
    write_csv(rows, ["cell", "lam", "seed", "arm", *METRICS, "source"], out / "sweep.csv")
    return out


# --------------------------------------------------------------------------- run tables
def test_run_table_numbers(tmp_path):
    text = render_run_table(_run_dir(tmp_path), label="docs/runs/x", show_seeds=True)
    c = compare_paired(BISSL, BASE)
    assert "Test top-1 accuracy (%) on `digits`, `small_cnn`, `simclr`, seeds 0–3 (4)" in text
    assert "machine, commit and date: not recorded" in text
    assert "Data: `docs/runs/x/results.json`" in text
    for name, acc in (("baseline", BASE), ("BiSSL", BISSL)):
        ms = f"{100 * statistics.mean(acc):.2f} ± {100 * statistics.stdev(acc):.2f}"
        assert f"| {name} | {ms} | {100 * min(acc):.2f} – {100 * max(acc):.2f} | 4 |" in text
    assert "| baseline | 96.24 ± 0.36 | 95.82 – 96.66 | 4 |" in text
    row = (
        f"| BiSSL − baseline | +0.28 | [{100 * c.ci_low:+.2f}, {100 * c.ci_high:+.2f}] | "
        f"{c.p_t:.3f} | {c.p_wilcoxon:.3f} | — | 4 |"
    )
    assert row in text
    assert "| 2 | 95.82 | 95.82 | +0.00 |" in text  # per-seed row


def test_run_table_mcnemar_and_provenance(tmp_path):
    run = _run_dir(tmp_path, correct=True)
    prov = write_provenance(run)
    text = render_run_table(run)
    pooled = mcnemar_pooled([([1] * 5 + [1, 0] + [1], [1] * 5 + [0] * 2 + [s % 2]) for s in range(4)])
    assert (pooled.only_a, pooled.only_b) == (6, 0)
    assert f"{pooled.p:.3f} (6/0)" in text
    assert f"run on {prov['machine']}, commit `{prov['commit']}`, {prov['date']}" in text
    per_seed = render_run_table(run, show_seeds=True)
    assert "McNemar p, BiSSL − baseline" in per_seed


def test_run_table_diagnostics_and_wall_time(tmp_path):
    """A seed's BiSSL-stage diagnostics are not an arm; their means make one sentence; the wall
    time bissl run recorded is stated."""
    per_seed = {
        s: {
            "baseline": _metrics(b),
            "bissl": _metrics(x),
            "diagnostics": {
                "distance_final": 0.5 + s,
                "prox_share_final": 0.01,
                "hg_cos_exact_mean": 0.99,
                "hg_cos_exact_min": 0.98 - 0.01 * s,
                "skipped": 0.0,
            },
        }
        for s, (b, x) in enumerate(zip(BASE, BISSL))
    }
    run = tmp_path / "diag"
    run.mkdir()
    meta = {"wall_s_this_process": 512.4, "workers": 2, "threads": 1}
    write_json_atomic(summarize(per_seed, meta=meta), run / "results.json")
    text = render_run_table(run, show_seeds=True)
    assert "| diagnostics" not in text  # no arm (row or column) named after them
    assert "wall time 512 s (2 worker process(es), 1 thread(s) each)" in text
    assert (
        "BiSSL stage, mean over seeds: ‖θ − φ‖ at the last lower step 2; proximal share of the lower "
        "gradient in the last stage 0.01; cosine of the hypergradient to a many-iteration MINRES "
        "solve 0.9900 (each seed's worst stage: 0.9650); upper steps skipped 0."
    ) in text


def test_run_table_errors(tmp_path):
    with pytest.raises(TableError, match=r"no results\.json"):
        render_run_table(tmp_path)
    run = _run_dir(tmp_path)
    with pytest.raises(TableError, match="arm 'matched' is not in"):
        render_run_table(run, compare="bissl-matched")
    with pytest.raises(TableError, match="metric='acc'"):
        render_run_table(run, metric="acc")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{}")
    with pytest.raises(TableError, match=r"not a results\.json"):
        render_run_table(tmp_path / "bad")


# --------------------------------------------------------------------------- sweep tables
def test_sweep_table_diagnostics(tmp_path):
    """diagnostics=yes: one row per cell from summary.csv's diag_* columns; missing ones are an error."""
    sweep = _sweep_dir(tmp_path)
    with pytest.raises(TableError, match="not every cell has the BiSSL stage's diagnostics"):
        render_sweep_table(sweep, diagnostics=True)
    cols = ["cell", "lam", "diag_distance_final", "diag_prox_share_final", "diag_hg_cos_exact_mean"]
    cols.append("diag_hg_cos_exact_min")
    rows = [
        {
            "cell": c,
            "lam": lam,
            "diag_distance_final": d,
            "diag_prox_share_final": 0.0123,
            "diag_hg_cos_exact_mean": 0.99,
        }
        for c, lam, d in (("lam=0.001", 0.001, 1.5), ("lam=0.01", 0.01, 0.25), ("lam=0.1", 0.1, 0.0625))
    ]
    write_csv(rows, cols, sweep / "summary.csv")
    text = render_sweep_table(sweep, diagnostics=True)
    assert "| lam | ‖θ − φ‖ (last lower step) | proximal share (last stage) |" in text
    assert "| 0.01 | 0.25 | 0.012 | 0.9900 | — |" in text  # the worst-stage column was not logged
    assert text.index("BiSSL stage per cell") > text.index("Holm:")


def test_sweep_table_with_holm(tmp_path):
    text = render_sweep_table(_sweep_dir(tmp_path))
    lines = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert [line.split(" | ")[0] for line in lines] == ["| 0.001", "| 0.01", "| 0.1"]
    comps = [compare_paired([BISSL[s] + shift * (s + 1) for s in range(4)], BASE) for shift in (0.0, 0.004, -0.003)]
    adjusted = holm([c.p_t for c in comps])
    for line, c, adj in zip(lines, comps, adjusted):
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[3] == f"{100 * c.mean:+.2f}"
        assert cells[5] == f"{c.p_t:.3f}" and cells[6] == f"{adj:.3f}"
        assert cells[-1] == "4"
    assert "3 cells, seeds 0–3 (4)" in text


def test_sweep_table_refuses_other_csv(tmp_path):
    (tmp_path / "sweep.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TableError, match="expected the columns"):
        render_sweep_table(tmp_path)


# --------------------------------------------------------------------------- markers
def _doc(tmp_path: Path, body: str) -> Path:
    _run_dir(tmp_path)
    _sweep_dir(tmp_path)
    path = tmp_path / "doc.md"
    path.write_text(body)
    return path


def test_regenerate_rewrites_only_the_blocks(tmp_path):
    body = (
        "# Title\n\nText before.\n<!-- table:run run per_seed=yes -->\nstale | table\n"
        "<!-- /table -->\nBetween.\n<!-- table:sweep sweep -->\n<!-- /table -->\nAfter.\n"
    )
    doc = _doc(tmp_path, body)
    assert check_files([doc]) == [str(doc)]
    assert update_files([doc]) == [str(doc)]
    new = doc.read_text()
    assert new.startswith("# Title\n\nText before.\n<!-- table:run run per_seed=yes -->\n\n")
    assert "stale | table" not in new and "Between.\n<!-- table:sweep sweep -->\n" in new
    assert new.endswith("<!-- /table -->\nAfter.\n")
    assert regenerate(new, tmp_path) == new  # idempotent
    assert check_files([doc]) == []
    # A hand edit inside a block is caught.
    doc.write_text(new.replace("96.24 ± 0.36", "96.42 ± 0.36"))
    assert check_files([doc]) == [str(doc)]


@pytest.mark.parametrize(
    "body, match",
    [
        ("<!-- table:run run -->\nno end\n", "without '<!-- /table -->'"),
        ("<!-- /table -->\n", "without a table marker"),
        ("<!-- table:run run -->\n<!-- table:run run -->\n<!-- /table -->\n", "inside the block"),
        ("<!-- table:run -->\n<!-- /table -->\n", "malformed marker"),
        ("<!-- table:plot run -->\n<!-- /table -->\n", "unknown table kind 'plot'"),
        ("<!-- table:run run colour=red -->\n<!-- /table -->\n", "unknown table option"),
        ("<!-- table:run missing -->\n<!-- /table -->\n", "doc.md:1: .*no results.json"),
    ],
)
def test_marker_errors(tmp_path, body, match):
    doc = _doc(tmp_path, body)
    with pytest.raises(TableError, match=match):
        check_files([doc])


def test_cli_report(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["report", str(run), str(_sweep_dir(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "| BiSSL − baseline |" in out and "p (t), Holm" in out
    assert main(["report", str(run), "--out", str(tmp_path / "t.md")]) == 0
    assert "| baseline | 96.24 ± 0.36" in (tmp_path / "t.md").read_text()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table:run run -->\n<!-- /table -->\n")
    assert main(["report", "--check", str(doc)]) == 1
    assert main(["report", "--update", str(doc)]) == 0
    assert main(["report", "--check", str(doc)]) == 0
    assert main(["report"]) == 2  # nothing to do: a usage error


# --------------------------------------------------------------------------- the docs themselves
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_tables_equal_their_data(path):
    """Every marked table of the README and docs/ is exactly what `make tables` writes."""
    find_blocks(path.read_text(), str(path))  # markers parse
    assert check_files([path]) == [], f"{path.name}: a generated table differs; run 'make tables'"
