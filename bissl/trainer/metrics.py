"""Metrics CSV (one row per logged step) and progress bars.

Columns are fixed so every phase writes the same file; cells a phase does not produce stay empty:

* ``seed, phase, part, step, round``: where the row comes from. ``phase`` is the pipeline phase
  (``pretext``, ``bissl``, ``pretext_matched``, ``finetune_bissl``, ``finetune_baseline``),
  ``part`` the kind of step (``pretext``, ``warmup``, ``lower``, ``upper``, ``train``, ``eval``),
  ``step`` the phase's 1-based optimizer step, ``round`` the epoch (or the BiSSL training stage).
* ``loss``: the step's loss: L_P (pretext, lower), L_D(φ, ψ_D) (warm-up, upper; with
  ``bissl.direct_term: theta`` upper rows hold L_D(θ, ψ_D)), L_D (fine-tuning).
* ``loss_theta``: upper steps: L_D(θ, ψ_D), the downstream loss at the lower backbone.
* ``prox``: lower steps: (λ/2)‖θ − φ‖².
* ``pretext_grad_norm, prox_grad_norm, distance``: lower steps: ‖∇_θ L_P‖ (averaged over ranks,
  before the proximal term and clipping), the proximal gradient's norm λ‖θ − φ‖, and ‖θ − φ‖.
* ``prox_share``: lower steps: the proximal term's share of the lower gradient,
  ``‖λ(θ − φ)‖ / ‖∇L_P + λ(θ − φ)‖`` (before clipping).
* ``skipped``: upper steps: 1 when the step was skipped for a non-finite hypergradient.
* ``lam``: lower and upper steps: the λ the step used (``bissl.lam_schedule``; constant by default;
  the mean over tensors for a per-tensor λ).
* ``lr``, ``grad_norm`` (before clipping).
* ``cg_iters, cg_residual, cg_converged, cg_negative_curvature, cg_nonfinite``: the inverse-HVP
  solver's diagnostics on upper steps.
* ``cg_indefinite, cg_ritz_min, cg_ritz_max, cg_condition, cg_action, cg_damping_used``: solver
  health on upper steps (:meth:`bissl.solvers.SolveResult.summary`): whether the system
  ``I + H/(λ+λ_damp)`` was flagged indefinite, the Ritz estimates of its extreme eigenvalues and
  condition number (NaN where the solver gives none), what ``bissl.on_indefinite`` did, and the
  damping of the system actually solved.
* ``hg_cos_exact``: the first upper step of each stage when ``bissl.exact_check_iters`` > 0: the
  cosine between the implicit part of the hypergradient as configured and the same system solved
  by MINRES to that many iterations (relative residual 1e-10) on the same batch.
* ``val_loss, val_acc``: evaluation rows.
* ``wall_s``: seconds since the phase (re)started in this process.

A checkpoint records the file size (:meth:`MetricsLog.offset`); resuming truncates the file back
to it, so rows of steps that are re-run after a crash are not duplicated.

TensorBoard (optional): when the ``tensorboard`` package is installed (the ``[tensorboard]``
extra) and ``BISSL_TENSORBOARD`` is not ``0``, every numeric cell is also written as a scalar to
``<seed dir>/tensorboard/`` with tag ``<phase>/<part>/<column>`` at the row's ``step``
(``tensorboard --logdir runs/<name>``). The CSV stays the record: the event files are a copy,
rebuilt from it whenever the log is opened on existing rows or truncated, so a resumed run shows no
duplicated steps.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

COLUMNS = (
    "seed",
    "phase",
    "part",
    "step",
    "round",
    "loss",
    "loss_theta",
    "prox",
    "lam",
    "lr",
    "grad_norm",
    "pretext_grad_norm",
    "prox_grad_norm",
    "distance",
    "prox_share",
    "skipped",
    "cg_iters",
    "cg_residual",
    "cg_converged",
    "cg_negative_curvature",
    "cg_nonfinite",
    "cg_indefinite",
    "cg_ritz_min",
    "cg_ritz_max",
    "cg_condition",
    "cg_action",
    "cg_damping_used",
    "hg_cos_exact",
    "val_loss",
    "val_acc",
    "wall_s",
)


#: Columns that say where a row comes from; every other numeric cell becomes a TensorBoard scalar.
_KEY_COLUMNS = ("seed", "phase", "part", "step", "round")
#: Folder of the TensorBoard copy, next to ``metrics.csv``.
TENSORBOARD_DIR = "tensorboard"


def tensorboard_enabled() -> bool:
    """Whether :class:`MetricsLog` writes a TensorBoard copy by default: the ``tensorboard``
    package is installed and ``BISSL_TENSORBOARD`` is not ``0``."""
    if os.environ.get("BISSL_TENSORBOARD", "1") == "0":
        return False
    return importlib.util.find_spec("tensorboard") is not None


class _TensorBoardCopy:
    """The numeric cells of logged rows as TensorBoard scalars in ``log_dir`` (tag
    ``phase/part/column``, step = the row's ``step``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def add(self, row: Mapping[str, Any]) -> None:
        writer = self._open()
        step = int(row.get("step") or 0)
        prefix = f"{row.get('phase') or 'run'}/{row.get('part') or 'step'}"
        for column in COLUMNS:
            value = row.get(column)
            if column in _KEY_COLUMNS or isinstance(value, str) or value is None:
                continue
            writer.add_scalar(f"{prefix}/{column}", float(value), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def rebuild(self, rows: list[dict[str, Any]]) -> None:
        """Replace every event file with the scalars of ``rows`` (the CSV's rows)."""
        self.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        for row in rows:
            self.add(row)
        self.flush()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: resumed and uninterrupted runs compare exactly
    return str(value)


class MetricsLog:
    """Append-only CSV with the fixed :data:`COLUMNS`.

    Args:
        path: the CSV file (created with a header when missing or empty).
        tensorboard: also write the TensorBoard copy to ``<path's folder>/tensorboard`` (default:
            :func:`tensorboard_enabled`). ``True`` without the package raises ``ImportError``.
    """

    def __init__(self, path: str | Path, tensorboard: bool | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Open for the log's lifetime (rows arrive one at a time); close() closes it.
        self._file = open(self.path, "a", newline="")  # noqa: SIM115
        if self._file.tell() == 0:
            self._file.write(",".join(COLUMNS) + "\n")
            self._file.flush()
        self._writer = csv.writer(self._file, lineterminator="\n")
        use_tb = tensorboard_enabled() if tensorboard is None else tensorboard
        if use_tb and importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "MetricsLog(tensorboard=True) needs the tensorboard package (pip install 'bissl[tensorboard]')"
            )
        self._tb = _TensorBoardCopy(self.path.parent / TENSORBOARD_DIR) if use_tb else None
        if self._tb is not None:
            self._tb.rebuild(read_metrics(self.path))  # a resumed run: mirror what the CSV holds

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row; keys must be in :data:`COLUMNS`."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"MetricsLog: unknown columns {sorted(unknown)}")
        self._writer.writerow([_cell(row.get(c)) for c in COLUMNS])
        if self._tb is not None:
            self._tb.add(row)

    def offset(self) -> int:
        """Flush and return the current file size in bytes."""
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        return self._file.tell()

    def truncate(self, offset: int) -> None:
        """Drop everything after byte ``offset`` (rows logged after the checkpoint being resumed)."""
        self._file.flush()
        size = self.path.stat().st_size
        if offset > size:
            raise ValueError(f"{self.path} has {size} bytes, the checkpoint expects at least {offset}")
        self._file.close()
        os.truncate(self.path, offset)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115  kept open, as in __init__
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self._tb is not None:
            self._tb.rebuild(read_metrics(self.path))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullMetrics:
    """The metrics log of ranks > 0 of a multi-rank run: rank 0 writes the rows."""

    def log(self, row: Mapping[str, Any]) -> None:
        return None

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        return None

    def close(self) -> None:
        return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics CSV; numeric cells as float, empty cells as None."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if text == "" or text is None:
                    row[key] = None
                elif key in ("phase", "part"):
                    row[key] = text
                else:
                    try:
                        row[key] = float(text)
                    except ValueError:
                        row[key] = text
            rows.append(row)
    return rows


def is_finite(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def progress_enabled(quiet: bool) -> bool:
    """Progress bars when not ``quiet`` and on an interactive terminal, unless ``BISSL_PROGRESS``
    says otherwise ("1" on, "0" off): rank processes write to a pipe their launcher forwards to
    the terminal, so they cannot see the terminal themselves."""
    forced = os.environ.get("BISSL_PROGRESS")
    if quiet or forced == "0":
        return False
    return forced == "1" or sys.stderr.isatty()


def progress_bar(total: int, desc: str, initial: int, enabled: bool, position: int = 0) -> tqdm:
    """A tqdm bar on stderr (a no-op object when disabled); ``position``: its line, for parallel
    seed processes."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
        position=position,
    )
