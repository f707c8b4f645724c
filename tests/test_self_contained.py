"""Every fact the code and docs cite lives in the repository: no citation of a file outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Citations of the notes that sit beside the repository on the machines it was built on.
OUTSIDE = re.compile(r"REFERENCE\.md|STYLE\.md|\.\./shared|/work/shared|\bshared/")


def _files():
    for pattern in (
        "bissl/**/*.py",
        "kernels/**/*.py",
        "csrc/**/*",
        "benchmarks/**/*.py",
        "docs/**/*.md",
        "*.md",
        "bissl/configs/*.yaml",
        "Makefile",
        "pyproject.toml",
        "setup.py",
    ):
        yield from (p for p in ROOT.glob(pattern) if p.is_file() and p.suffix not in (".so", ".o", ".png"))


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for path in _files():
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)
