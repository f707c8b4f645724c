"""Sweep grids: ``--grid key=v1,v2,...`` parsing, validation against the config, cells and names.

A grid maps dotted config keys to lists of values. Two designs turn it into cells:

* ``grid`` (``--grid``): the Cartesian product, in the order the keys were given (the last key
  varies fastest);
* ``axes`` (``--axis``): one factor at a time, as sensitivity studies vary hyperparameters: a
  ``base`` cell (the config as it is) and, per key, one cell for each value that differs from the
  base, every other key at its base value. ``k`` axes of ``n`` values cost ``1 + k(n-1)`` cells
  where the product costs ``n^k``. A cell is applied to the base config as
``key=<JSON of the value>`` overrides: JSON is a subset of the YAML that
:func:`bissl.config.parse_override` reads, so a cell's override reads back as exactly its value.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bissl.config import ConfigError, config_to_dict, load_config, parse_override

#: Keys a grid may not sweep, with what to use instead.
FORBIDDEN_KEYS = {
    "run.seeds": "use --seeds N (every cell runs the same seeds)",
    "run.name": "the sweep names the cell directories",
    "run.out_dir": "use --out DIR",
}
FORBIDDEN_PREFIXES = {"debug.": "fault injection is not a hyperparameter"}
#: Longest cell directory name; longer names are cut and end in a hash of the full name.
MAX_NAME_LENGTH = 120

Grid = dict[str, list[Any]]
#: How a grid becomes cells: the Cartesian product or one factor at a time.
DESIGNS = ("grid", "axes")
#: The name of the axes design's cell that runs the config unchanged.
BASE_CELL = "base"


@dataclass(frozen=True)
class Cell:
    """One point of the grid.

    Attributes:
        name: the cell's directory name under ``<out>/cells/`` (readable, filesystem-safe, unique).
        values: swept key -> value, in grid-key order.
    """

    name: str
    values: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> list[str]:
        """The cell as ``key=value`` overrides for :func:`bissl.config.load_config`."""
        return [override_text(key, value) for key, value in self.values.items()]


def override_text(key: str, value: Any) -> str:
    """``key=<value as JSON>``, which :func:`bissl.config.parse_override` reads back exactly."""
    try:
        return f"{key}={json.dumps(value, allow_nan=False)}"
    except (TypeError, ValueError):
        raise ConfigError(
            f"--grid {key}: value {value!r} is not a plain number, string, boolean, list or mapping"
        ) from None


def split_values(text: str) -> list[str]:
    """Split ``"1e-3,[16, 8],'a,b'"`` at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth != 0:
        raise ConfigError(f"unbalanced quotes or brackets in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_grid_args(items: Sequence[str], flag: str = "--grid") -> Grid:
    """``["bissl.lam=1e-3,1e-2", "bissl.solver=cg,identity"]`` -> ``{key: [values]}``.

    Values are read as YAML (like ``--set``), so ``1e-3`` is a float and ``cg`` a string.

    Raises:
        ConfigError: an item without ``=``, an empty value, or a key given twice.
    """
    grid: Grid = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} must look like 'section.key=value1,value2,...'")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in grid:
            raise ConfigError(f"{flag} key '{key}' is given twice; list all its values in one {flag}")
        values = []
        for piece in split_values(text):
            if not piece:
                raise ConfigError(f"{flag} {key}: empty value in {text!r}")
            values.append(parse_override(f"{key}={piece}")[1])
        grid[key] = values
    return grid


def value_label(value: Any) -> str:
    """A value as it appears in cell names and plot ticks (``0.001``, ``cg``, ``16-16-8``)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(value_label(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{value_label(v)}" for k, v in value.items())
    return str(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key ends with (``bissl.lower.lr`` and
    ``bissl.upper.lr`` -> ``lower.lr``, ``upper.lr``; a lone ``bissl.lam`` -> ``lam``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def _safe(text: str) -> str:
    """Keep letters, digits and ``. + - =``; anything else (``/``, spaces, quotes) becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", text)


def cell_names(grid: Mapping[str, Sequence[Any]], combos: Sequence[tuple[Any, ...]]) -> list[str]:
    """Readable, filesystem-safe, unique directory names, e.g. ``lam=0.001__solver=cg``.

    Keys are shortened to their shortest unique suffix; names longer than
    :data:`MAX_NAME_LENGTH`, or equal after making them safe, get a hash of the cell's values.
    """
    short = short_keys(list(grid))
    names = ["__".join(_safe(f"{short[k]}={value_label(v)}") for k, v in zip(grid, combo)) for combo in combos]
    return _bounded(names, combos)


def _bounded(names: list[str], combos: Sequence[Any]) -> list[str]:
    """``names`` with each too long, duplicated or hidden one cut and suffixed with a hash of its
    cell's values."""
    for i, (name, combo) in enumerate(zip(names, combos)):
        if len(name) > MAX_NAME_LENGTH or names.count(name) > 1 or name.startswith("."):
            digest = hashlib.sha256(json.dumps(list(combo)).encode()).hexdigest()[:10]
            names[i] = f"{name[: MAX_NAME_LENGTH - 11].lstrip('.')}_{digest}"
    return names


def make_cells(grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """The Cartesian product of the grid, first key slowest."""
    combos = list(itertools.product(*grid.values()))
    names = cell_names(grid, combos)
    return [Cell(name, dict(zip(grid, combo))) for name, combo in zip(names, combos)]


def _check_key(key: str) -> None:
    if key in FORBIDDEN_KEYS:
        raise ConfigError(f"--grid cannot sweep '{key}': {FORBIDDEN_KEYS[key]}")
    for prefix, why in FORBIDDEN_PREFIXES.items():
        if key.startswith(prefix):
            raise ConfigError(f"--grid cannot sweep '{key}': {why}")


def _check_values(
    config_path: str | Path | None, grid: Mapping[str, Sequence[Any]], overrides: Sequence[str], flag: str
) -> None:
    """Every key sweepable, not also fixed, with a non-empty list of valid, distinct values."""
    if not isinstance(grid, Mapping):
        raise ConfigError(f"the grid must map keys to lists of values, got {type(grid).__name__}")
    if not grid:
        raise ConfigError(f"the grid is empty: give at least one {flag} KEY=VALUE1,VALUE2,...")
    fixed = {".".join(parse_override(o)[0]) for o in overrides}
    for key, values in grid.items():
        _check_key(key)
        if key in fixed:
            raise ConfigError(f"'{key}' is both swept ({flag}) and fixed (--set); choose one")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"{flag} {key}: needs a non-empty list of values, got {values!r}")
        for value in values:
            try:
                load_config(config_path, [*overrides, override_text(key, value)])
            except ConfigError as err:
                msg = str(err).removeprefix("config error: ")
                raise ConfigError(f"{flag} {key}={value_label(value)}: {msg}") from None
    for key, values in grid.items():
        labels = [json.dumps(v, sort_keys=True) for v in values]
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dupes:
            raise ConfigError(f"{flag} {key}: value {dupes[0]} is listed twice")


def _resolved(config_path: str | Path | None, overrides: Sequence[str], cell: Cell) -> str:
    try:
        cfg = load_config(config_path, [*overrides, *cell.overrides()])
    except ConfigError as err:
        msg = str(err).removeprefix("config error: ")
        raise ConfigError(f"cell {cell.name}: {msg}") from None
    return json.dumps(config_to_dict(cfg), sort_keys=True, default=str)


def _check_distinct(config_path: str | Path | None, cells: Sequence[Cell], overrides: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for cell in cells:
        resolved = _resolved(config_path, overrides, cell)
        if resolved in seen:
            raise ConfigError(
                f"cells {seen[resolved]} and {cell.name} resolve to the same config "
                "(e.g. 1 and 1.0 for a float key); list each value once"
            )
        seen[resolved] = cell.name


def validate_grid(
    config_path: str | Path | None, grid: Mapping[str, Sequence[Any]], overrides: Sequence[str]
) -> list[Cell]:
    """Check every key, every value and every cell against the config; return the cells.

    Nothing runs here: a bad key or value fails before the first cell starts.

    Raises:
        ConfigError: one line naming the bad key or value (an unknown key, a value of the wrong
            type or range, a key also fixed with ``--set``, duplicate values, a cell whose
            combination of values is invalid, two cells with the same resolved config).
    """
    _check_values(config_path, grid, overrides, "--grid")
    cells = make_cells(grid)
    _check_distinct(config_path, cells, overrides)
    return cells


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a nested config dict (``config_to_dict``)."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def validate_axes(
    config_path: str | Path | None, axes: Mapping[str, Sequence[Any]], overrides: Sequence[str]
) -> tuple[list[Cell], Grid]:
    """One-factor-at-a-time cells (the ``axes`` design), checked like :func:`validate_grid`.

    A listed value that resolves to the config's own value is the base cell's, not a cell of its
    own; every axis without such a value gets the config's value put first, so each axis of the
    returned grid holds its base value and reads back (``--resume``) as the same cells.

    Returns:
        ``(cells, grid)``: the ``base`` cell, then per axis in order one cell per other value
        (``Cell.values`` holds every axis, the others at their base values); and the grid with
        the base values included.

    Raises:
        ConfigError: as :func:`validate_grid`.
    """
    _check_values(config_path, axes, overrides, "--axis")
    base_text = _resolved(config_path, overrides, Cell(BASE_CELL, {}))
    base_dict = json.loads(base_text)
    grid: Grid = {}
    base: dict[str, Any] = {}
    others: dict[str, list[Any]] = {}
    for key, values in axes.items():
        at_base = [v for v in values if _resolved(config_path, overrides, Cell("", {key: v})) == base_text]
        base[key] = at_base[0] if at_base else config_value(base_dict, key)
        grid[key] = list(values) if at_base else [base[key], *values]
        others[key] = [v for v in values if not at_base or v is not at_base[0]]
    short = short_keys(list(axes))
    varied = [(key, v) for key, values in others.items() for v in values]
    # Every name holds '=', so none can be the base cell's.
    names = _bounded([_safe(f"{short[k]}={value_label(v)}") for k, v in varied], [[k, v] for k, v in varied])
    cells = [Cell(BASE_CELL, dict(base))] + [Cell(n, {**base, k: v}) for n, (k, v) in zip(names, varied)]
    _check_distinct(config_path, cells, overrides)
    return cells, grid
