"""Small shared helpers: atomic file writes (text, JSON, CSV), run-folder naming, environment facts."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy
import sklearn
import torch
import torchvision

from leukodetect import __version__


def atomic_write(path: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> Path:
    """Write a file through ``write(tmp_path)`` then move it into place.

    A crash mid-write leaves the previous file intact instead of a half-written one. This is the
    project's one temporary-file-and-rename writer; the helpers below build on it.

    Args:
        write: writes the whole file to the temporary path it is given (same folder as ``path``).
        exclusive: refuse to replace an existing ``path`` (FileExistsError, the file untouched).
            The temporary file is hard-linked into place, and the link fails if the name is taken,
            so the check and the write are one step, even against another process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8 atomically; line endings are written as given, never translated."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8", newline=""))


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(
    path: Path,
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str] | None = None,
    *,
    lineterminator: str = "\r\n",
) -> Path:
    """Write dict rows as a CSV file with a header line, atomically.

    Args:
        rows: one mapping per line; a key missing from a row is written as an empty cell, a key
            not in ``fieldnames`` is an error (csv.DictWriter's rules).
        fieldnames: the columns in order; by default every key of the rows, in the order first seen.
            With no rows and no fieldnames there are no columns, and the file is empty.
        lineterminator: csv's default ``"\r\n"`` (RFC 4180); ``"\n"`` where a file is meant for
            line-based tools.
    """
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        if not fieldnames:
            return atomic_write_text(path, "")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def cache_dir() -> Path:
    """leukodetect's cache folder: ``$LEUKODETECT_CACHE`` if set, else ``~/.cache/leukodetect``.

    Holds what can be rebuilt: ALL-IDB2 source matches and ONNX exports of checkpoints.
    """
    return Path(os.environ.get("LEUKODETECT_CACHE") or Path.home() / ".cache" / "leukodetect").expanduser()


def environment_facts() -> dict[str, str]:
    """Machine, date and library versions, for reports and checkpoints."""


    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs".strip(),
        "python": platform.python_version(),
        "leukodetect": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def fresh_dir(path: Path) -> Path:
    """``path`` if it is free, else ``path-2``, ``path-3``...: earlier results are never overwritten."""
    path = Path(path)
    def occupied(p: Path) -> bool:
        return p.exists() and (not p.is_dir() or any(p.iterdir()))

    candidate, n = path, 1
    while occupied(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
