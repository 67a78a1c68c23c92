"""Atomic file writes: fill a temp file in the target's folder, flush it to disk, then rename it over the target.

A reader sees either the old file or the whole new one, never a partial file; a failed write leaves an existing
file untouched and no temp file behind. Temp files are named ``.<name>.<random>.tmp``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

FILE_MODE = 0o644
"""Permissions of a written file (mkstemp alone would leave 0o600)."""


def atomic_write(path: PathLike, write_fn: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``write_fn(handle)`` fills a temp file opened with ``mode`` ("wb", or "w" for
    UTF-8 text) in the same folder, which is fsynced and renamed over ``path``.

    Creates the parent folder. On any error the temp file is removed, ``path`` is left as it was and the error
    propagates. Returns ``path`` as a Path.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else "utf-8") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json_atomic(
    path: PathLike,
    obj: Any,
    indent: Optional[int] = 2,
    sort_keys: bool = False,
    trailing_newline: bool = False,
) -> Path:
    """Serialise ``obj`` with ``json.dumps(obj, indent=indent, sort_keys=sort_keys)`` (plus a final newline if
    ``trailing_newline``) and write it to ``path`` atomically. Returns ``path`` as a Path.

    The object is serialised before any file is created, so an unserialisable object leaves no trace.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + ("\n" if trailing_newline else "")
    return atomic_write(path, lambda handle: handle.write(text), mode="w")
