"""Atomic file writes: write to a hidden temporary file beside the target, then rename.

A reader never sees a half-written file, and a crash leaves at most a
``.<name>.tmp-*`` file, which :func:`remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_MARKER = ".tmp-"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary file keeps the target's suffixes (``.nii.gz``), so writers that
    choose a format by file name still work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}{TEMP_MARKER}", suffix=suffix, dir=target.parent
    )
    os.close(handle)
    temp_path = Path(temp_name)
    # mkstemp creates the file 0600; give the result the usual permissions.
    os.chmod(temp_path, 0o666 & ~_current_umask())
    try:
        yield temp_path
        os.replace(temp_path, target)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as temp_path:
        temp_path.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(temp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as temp_path:
        writer(temp_path)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files that an interrupted atomic write left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(".") and TEMP_MARKER in path.name and path.is_file():
            path.unlink()
            removed.append(path)
    return removed
