"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every writer goes to a temporary file in the target's directory (so ``os.replace`` is a rename on one
file system), fsyncs it, renames it over the target and fsyncs the directory so the rename survives a
power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    """Flushes a directory entry to disk (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, before any threads exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def _temp_path(path: Path) -> Path:
    """Reserves a fresh temporary file name beside ``path``, with the mode a plain ``open`` would give."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the final file should be as readable as any other file in the run.
        os.fchmod(fd, _FILE_MODE)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)
    return Path(name)


def is_temp_name(name: str) -> bool:
    """True for the names `_temp_path` gives: ``.<target name>.<random>.tmp``."""
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_stale_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporary files that writers killed mid-write left under ``root`` (recursively); returns them.

    Only for a directory no other process is writing to (e.g. a build resuming its own unfinished run): a
    live writer's temporary file is indistinguishable from a dead one's.
    """
    removed = []
    for path in sorted(Path(root).rglob("*.tmp")):
        if path.is_file() and is_temp_name(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` that replaces ``path`` on a clean exit.

    The caller writes the temporary file by any means (e.g. ``faiss.write_index``). On a clean exit it is
    fsynced and renamed onto ``path``; if the block raises, the temporary file is removed and ``path`` is
    left untouched.

    Args:
        path: The final destination. Its parent directory must exist.

    Yields:
        The temporary path to write to. It exists (empty) when yielded.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path: parent directory of {str(target)!r} does not exist")
    tmp = _temp_path(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically.

    Args:
        path: The destination file.
        data: The full new content.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: The destination file.
        text: The full new content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    # Imported lazily: numpy values are common in configs, but this module needs no numpy otherwise.
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"obj: {type(value).__name__} is not JSON serialisable: {value!r}")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as JSON (sorted keys, indent 2, trailing newline) to ``path`` atomically.

    Args:
        path: The destination file.
        obj: A JSON-serialisable object; numpy scalars and arrays are converted to Python numbers and
            lists, tuples to lists. NaN and infinity are refused (they are not JSON).
    """
    text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write_text(path, text)


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Writes a matplotlib figure to ``path`` as PNG, atomically; returns the path."""
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return p
