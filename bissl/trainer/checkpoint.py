"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then moved over
the old one with ``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either the
previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import pickle
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


class CheckpointError(RuntimeError):
    """A checkpoint file holds something the safe loader refuses (not tensors, containers, numbers
    and strings), e.g. an arbitrary pickled object, or a file written before RNG states were
    stored as tensors."""


def load_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU, safely.

    ``weights_only=True``: the unpickler rebuilds only tensors, dicts, lists, tuples, strings and
    numbers, never runs code from the file. Everything this library saves is of those kinds (RNG
    states included, :func:`bissl.trainer.rng.capture_global_rng`).

    Raises:
        CheckpointError: the file holds any other object (the message names it).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next(
            (line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
        )
        raise CheckpointError(
            f"{path} is not a checkpoint bissl loads: it holds objects the safe "
            f"loader (torch.load weights_only=True) refuses ({detail})"
        ) from None
