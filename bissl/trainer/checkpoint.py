"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then moved over
the old one with ``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either the
previous checkpoint or the new one, never a truncated file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU.

    ``weights_only=False``: our checkpoints hold numpy/python RNG states, and they are files this
    library wrote itself; do not load checkpoints from untrusted sources.
    """
    return torch.load(Path(path), map_location="cpu", weights_only=False)
