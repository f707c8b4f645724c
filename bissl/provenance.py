"""Where and when a result was produced: machine, code commit, date.

Runs record it as ``provenance.json`` in their run (or sweep) directory, written by
:func:`write_provenance` when the run starts; :mod:`bissl.report_tables` prints it under every
generated table, so a number in the docs always says which machine and commit made it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

#: File name of the record in a run or sweep directory.
PROVENANCE_JSON = "provenance.json"


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_commit() -> str | None:
    """Short commit hash of the checkout this package runs from, ``-dirty`` when tracked files
    differ from it; None outside a git checkout (an installed wheel)."""
    commit = _git("rev-parse", "--short=10", "HEAD")
    if not commit:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if dirty else commit


def collect_provenance(device: str | None = None) -> dict[str, Any]:
    """``{"machine", "commit", "date", "torch"}`` of this process.

    ``machine`` reads like ``"Linux x86_64, 2 CPUs (AMD EPYC)"`` (plus ``device`` when given, e.g.
    a GPU name); ``date`` is UTC, ISO 8601 to the second.
    """
    import torch

    cpu = cpu_model()
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
        + (f" ({cpu})" if cpu else "")
        + (f", {device}" if device else "")
    )
    return {
        "machine": machine,
        "commit": code_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
    }


def write_provenance(directory: str | Path, device: str | None = None) -> dict[str, Any]:
    """Write :func:`collect_provenance` to ``directory/provenance.json``; returns it."""
    record = collect_provenance(device)
    path = Path(directory) / PROVENANCE_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_provenance(directory: str | Path, results: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The provenance of a run or sweep directory: ``results["provenance"]`` when the results carry
    one, else ``directory/provenance.json``, else None (runs made before it was recorded)."""
    if results is not None and isinstance(results.get("provenance"), dict):
        return results["provenance"]
    path = Path(directory) / PROVENANCE_JSON
    if path.is_file():
        return json.loads(path.read_text())
    return None
