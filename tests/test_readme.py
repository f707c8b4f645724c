"""Every Python block of the README must run as written (each in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(), flags=re.S)
#: What each block must print (its own asserts check the numbers).
EXPECTED = {
    "implicit_hypergrad": ("residual_norm", "0.weight"),
    "custom_argmin": ("finite differences", "validation loss"),
}


def test_readme_has_the_api_examples():
    for name in EXPECTED:
        assert any(name in block for block in BLOCKS), f"README.md has no python example of {name}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, capsys):
    block = BLOCKS[index]
    exec(compile(block, f"README.md (python block {index + 1})", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    for name, needles in EXPECTED.items():
        if name in block:
            for needle in needles:
                assert needle in out, f"block {index + 1} did not print {needle!r}"
