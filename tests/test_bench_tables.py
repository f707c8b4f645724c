"""The README's performance and scale sections and the kernel table of docs/performance.md are exactly
what benchmarks/make_tables.py makes from the JSON."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_performance_section_is_generated_from_the_results():
    tables = _make_tables()
    assert tables.update_readme(check=True), (
        "README.md's performance section differs from benchmarks/make_tables.py's output: "
        "run python benchmarks/make_tables.py"
    )


def test_every_network_and_form_has_a_row():
    tables = _make_tables()
    section = tables.section()
    missing = tables.missing_results()
    if missing:
        # No runs of this code yet: the section says which files are missing and shows no number.
        assert all(f"benchmarks/results/{name}" in section for name in missing)
        assert "×" not in section and " ms" not in section
        return
    for label in tables.PROBLEM_LABELS.values():
        assert label in section
    for row in ("| `cg` | dict |", "| `cg` | tuple |", "| `cg_layerwise` | dict |"):
        assert row in section
    assert "bissl bench --model resnet18" in section and "speed-up" in section


def test_performance_doc_kernel_table_is_generated_from_the_results():
    tables = _make_tables()
    assert tables.update_performance_doc(check=True), (
        "docs/performance.md's convolution-kernel table differs from benchmarks/make_tables.py's output: "
        "run python benchmarks/make_tables.py"
    )
    section = tables.conv_kernels_section()
    if all((tables.RESULTS / name).exists() for name in tables.CONV_KERNEL_RUNS):
        for _, what, _, _ in tables.CONV_KERNEL_STUDIES:
            assert what in section
    else:
        assert "study_conv_kernels.py" in section and " ms" not in section
