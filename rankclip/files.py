"""Atomic file writes: a file under its real name is always whole, never half written.

Every write goes to a hidden temporary file in the same folder (`.NAME.tmp<pid>`), is flushed
and fsynced, renamed over the real name, and the folder is fsynced so the rename survives a
power cut; on failure the temporary file is removed and the previous file stays as it was.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def temporary_name(path: Path) -> Path:
    """The hidden temporary file that `path` is written through (per process, so writers never collide)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def leftover_temporaries(folder: Path) -> list[Path]:
    """The temporary files in `folder` of writes that never finished (a killed process skips the cleanup)."""
    return sorted(folder.glob(".*.tmp[0-9]*"))


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (the new name lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield the temporary name to fill; when the block succeeds it replaces `path` durably, and it never outlives the block."""
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """An open file whose content becomes `path` (fsynced, renamed into place) when the block succeeds."""
    with _replacing(path) as tmp, open(tmp, mode, **open_args) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically, making its folder if needed."""
    import torch  # here, so that the plotting and download scripts write files without loading torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_alias(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically: a hard link when the file system allows one, else a
    copy that is fsynced before it is renamed into place."""
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
