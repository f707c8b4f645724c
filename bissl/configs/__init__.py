"""The configs that ship with bissl (package data): the demos and the published-scale reference.

``bissl run demo_digits`` (or ``demo_digits.yaml``) finds them by name from any install, a wheel
included; a path to an existing file always wins over a packaged name.
"""

from __future__ import annotations

from pathlib import Path

#: Folder of the packaged ``*.yaml`` configs.
CONFIG_DIR = Path(__file__).resolve().parent


def packaged_configs() -> list[str]:
    """Names of the packaged configs, without ``.yaml``, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """``name_or_path`` if it is an existing file, else the packaged config of that name.

    A bare name (``demo_digits`` or ``demo_digits.yaml``, no folder part) that is not a file in
    the working directory resolves to the packaged file. Anything else is returned unchanged, so
    reading it reports the missing file.
    """
    path = Path(name_or_path)
    if path.exists() or path.parent != Path("."):
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml", ".json") else f"{path.name}.yaml")
    return packaged if packaged.is_file() else path
