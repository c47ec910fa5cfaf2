"""Atomic file writes for the engine: a reader (or a crash) sees the old file or the whole new one, never a part.

Every file the engine writes (LoRAs, checkpoints, samples, JSON, states) goes through here: a hidden temporary
name in the target's folder (so ``os.replace`` is a rename, and folder scans never list it), fsync of the data,
``os.replace`` onto the real name, fsync of the folder (so the rename survives a power loss).

``tempfile.mkstemp`` creates files with mode 600 whatever the umask; a LoRA written that way could not be read by
an A1111 or ComfyUI running as another user, so the finished file gets the mode the umask gives a normal file.
Torch-free: the bot may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder; filesystems that refuse to fsync a folder are fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode(folder: bool = False) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def temp_path(path: Path, folder: bool = False) -> Path:
    """A fresh hidden name beside ``path`` that keeps its suffix (PIL and safetensors pick formats by it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, path: Path, folder: bool = False, replace: bool = True) -> Path:
    """Make the finished temporary ``tmp`` the real ``path``: fsync it, give it the umask's mode, rename, fsync
    the parent. A folder that already stands at ``path`` is replaced whole, or with ``replace=False`` kept (a
    cache another process filled with the same content first; readers may be using it)."""
    if folder:
        if path.exists() and not replace:
            return path
        for p in tmp.rglob("*"):
            fsync_path(p)
        os.chmod(tmp, _umask_mode(folder=True))
        if path.exists():
            shutil.rmtree(path)
    else:
        os.chmod(tmp, _umask_mode())
    fsync_path(tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        if folder and not replace and path.exists():  # the other builder won the race
            return path
        raise
    fsync_path(path.parent)
    return path


def write_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file under a temporary name, then put it in place atomically.
    On any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        return commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` atomically when the block ends without an exception."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_atomic(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """A temporary folder to fill; on a clean exit it replaces ``path`` whole (or, with ``replace=False``, is
    dropped when ``path`` already exists), otherwise it is removed."""
    path = Path(path)
    tmp = temp_path(path, folder=True)
    try:
        yield tmp
        commit(tmp, path, folder=True, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
