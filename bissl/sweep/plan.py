"""A validated sweep (config, grid, seeds, cells, sharing) and its manifest ``<out>/sweep.json``.

The manifest records everything needed to continue the sweep (``bissl sweep --resume DIR``) and
to refuse running a different sweep into the same directory. Changing the grid, the seeds, the
sharing or the config of an existing sweep directory is an error (the sweep is not extended):
cell names, the provider cell and the baseline every cell is compared with all follow from the
whole grid, so a changed grid is a new sweep, in a new directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bissl.config import Config, ConfigError, config_to_dict, diff_configs, load_config, with_defaults
from bissl.sweep.grid import BASE_CELL, DESIGNS, Cell, Grid, validate_axes, validate_grid
from bissl.sweep.sharing import SharingPlan, plan_sharing
from bissl.trainer.experiment import RESUMABLE_CHANGES
from bissl.trainer.report import write_json_atomic

MANIFEST = "sweep.json"
MANIFEST_FORMAT = 1
CELLS_DIR = "cells"


@dataclass
class SweepPlan:
    """Everything a sweep runs, decided (and validated) before anything runs.

    Attributes:
        config_path: the base config file (``None``: the built-in defaults).
        grid: swept key -> values, in the order given (``axes``: each axis with its base value).
        overrides: the fixed ``--set`` overrides (without ``run.seeds``).
        seeds: the seeds every cell runs.
        cells: the Cartesian product of the grid, first key slowest; or (``axes``) the base cell
            and one cell per other value of each axis.
        sharing: what the cells share (:mod:`bissl.sweep.sharing`).
        base_config: the resolved config before the grid is applied (``config_to_dict``).
        share: whether sharing was asked for (``False``: ``--no-share``).
        design: ``"grid"`` (Cartesian product, ``--grid``) or ``"axes"`` (one factor at a time,
            ``--axis``).
    """

    config_path: Path | None
    grid: Grid
    overrides: list[str]
    seeds: list[int]
    cells: list[Cell]
    sharing: SharingPlan
    base_config: dict[str, Any]
    share: bool = True
    design: str = "grid"

    @property
    def base_values(self) -> dict[str, Any] | None:
        """The axes design's base value of every swept key (None for a Cartesian grid)."""
        if self.design != "axes":
            return None
        return next(dict(c.values) for c in self.cells if c.name == BASE_CELL)

    def run_overrides(self, cell: Cell) -> list[str]:
        """All overrides of ``cell``'s run: fixed, seeds, the cell's values, and
        ``baseline.enabled=false`` for cells whose baseline the provider runs."""
        extra = ["baseline.enabled=false"] if self.sharing.baseline and cell.name != self.sharing.provider else []
        return [*self.overrides, f"run.seeds={json.dumps(self.seeds)}", *cell.overrides(), *extra]

    def cell_config(self, cell: Cell) -> Config:
        return load_config(self.config_path, self.run_overrides(cell))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "design": self.design,
            "config": str(self.config_path) if self.config_path is not None else None,
            "overrides": self.overrides,
            "seeds": self.seeds,
            "grid": self.grid,
            "share": self.share,
            "sharing": self.sharing.to_json(),
            "cells": {c.name: {"values": c.values, "overrides": self.run_overrides(c)} for c in self.cells},
            "base_config": self.base_config,
        }


def resolve_seeds(seeds: int | Sequence[int] | None, cfg: Config) -> list[int]:
    """``N`` -> ``0..N-1``; a sequence as given; ``None`` -> the config's ``run.seeds``."""
    if seeds is None:
        return list(cfg.run.seeds)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise ConfigError(f"seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    return [int(s) for s in seeds]


def _as_json(key: str, values: Any) -> Any:
    """Tuples -> lists (by a JSON round trip), so a grid equals the one read back from sweep.json."""
    if not isinstance(values, (list, tuple)):
        return values  # validate_grid names the problem
    try:
        return json.loads(json.dumps(list(values)))
    except (TypeError, ValueError):
        raise ConfigError(
            f"--grid {key}: values must be plain numbers, strings, booleans, lists or mappings, got {values!r}"
        ) from None


def build_plan(
    config_path: str | Path | None,
    grid: Mapping[str, Sequence[Any]],
    *,
    seeds: int | Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    share: bool = True,
    design: str = "grid",
) -> SweepPlan:
    """Validate the config, the fixed overrides, the seeds and every grid key, value and cell.

    ``design`` is ``"grid"`` (the Cartesian product of the values) or ``"axes"`` (one factor at a
    time around the config: :func:`bissl.sweep.grid.validate_axes`).

    Raises:
        ConfigError: one line naming the bad key or value; nothing has run.
    """
    path = Path(config_path).resolve() if config_path is not None else None
    overrides = list(overrides)
    seed_list = resolve_seeds(seeds, load_config(path, overrides))
    fixed = [*overrides, f"run.seeds={json.dumps(seed_list)}"]
    base = load_config(path, fixed)
    grid_lists: dict[str, list[Any]] = {str(k): _as_json(k, v) for k, v in grid.items()}
    if design not in DESIGNS:
        raise ConfigError(f"sweep design must be one of {', '.join(DESIGNS)}, got {design!r}")
    if design == "axes":
        cells, grid_lists = validate_axes(path, grid_lists, fixed)
    else:
        cells = validate_grid(path, grid_lists, fixed)
    configs = (load_config(path, [*fixed, *c.overrides()]) for c in cells)
    sharing = plan_sharing(list(grid_lists), [c.name for c in cells], configs, enabled=share)
    return SweepPlan(path, grid_lists, overrides, seed_list, cells, sharing, config_to_dict(base), share, design)


def _semantic_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [k for k in diff_configs(saved, current) if k not in RESUMABLE_CHANGES and not k.startswith("debug.")]


def write_or_check_manifest(plan: SweepPlan, out: Path) -> bool:
    """Write ``out/sweep.json``, or check that the sweep already there is this one.

    Returns:
        True when an existing sweep is being continued.

    Raises:
        ConfigError: ``out`` holds a different sweep (grid, seeds, sharing or config differ).
    """
    path = out / MANIFEST
    current = plan.to_json()
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(current, path)
        return False
    saved = read_manifest(out)

    def decision(manifest: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in manifest.get("sharing", {}).items() if k != "reason"}

    # Compared as JSON text: 1 and 1.0 are different cells (and directory names).
    saved = {"design": "grid", **saved}  # manifests written before the axes design
    what = [
        name
        for name in ("design", "grid", "seeds", "share")
        if json.dumps(saved.get(name)) != json.dumps(current[name])
    ]
    if decision(saved) != decision(current):
        what.append("sharing")
    changed = _semantic_changes(with_defaults(saved.get("base_config", {})), current["base_config"])
    if changed:
        what.append(f"config ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})")
    if what:
        raise ConfigError(
            f"{out} holds a different sweep ({', '.join(what)} differ); a sweep "
            "directory is never extended: choose another --out, or continue "
            f"that sweep with --resume {out}"
        )
    return True  # the manifest stays as first written


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep directory.

    Raises:
        ConfigError: no manifest, or one this version cannot read.
    """
    path = Path(out) / MANIFEST
    if not path.exists():
        raise ConfigError(f"{out} is not a sweep directory (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path} has format {data.get('format')!r}; this bissl reads format {MANIFEST_FORMAT}")
    return data


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / CELLS_DIR / cell.name
