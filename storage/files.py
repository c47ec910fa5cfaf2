"""The file store under the data directory, and atomic writes.

Layout (see docs/design.md):
    data_dir/datasets/<dataset id>/<sha256>.<ext>     content-addressed images
    data_dir/snapshots/<dataset id>-<digest>/         frozen copies that train jobs read (hardlinks)
    data_dir/jobs/<job id>/{spec.toml, state/, samples/, outputs/, events.jsonl}
    data_dir/inputs/{loras,pairs}/...                 uploaded LoRAs and pair images (content-addressed)
    data_dir/logs/worker-<n>.log                      worker stderr

Privacy: loraforge.db and the link secret are 600, datasets/ snapshots/ inputs/ logs/ are 700 (files
written here through mkstemp are 600). Job results follow the umask so other local tools can read them.

Every write goes to a temporary name in the same directory, is flushed and fsynced, then
``os.replace``d onto the real name and the directory is fsynced: a reader (or a crash) sees the
old file or the whole new one, never half of one. All functions here block; async callers wrap
big writes in ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on Windows; harmless to skip there.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_in(path: Path) -> tuple[int, Path]:
    # Same directory (so os.replace is a rename, not a copy); keep the suffix so tools that pick
    # a format from the extension (PIL.Image.save, safetensors) still work on the temp name.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    return fd, Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it becomes ``path`` atomically. On an exception the temp
    file is deleted and ``path`` is untouched (an older version, if any, stays)."""
    path = Path(path)
    fd, tmp = _temp_in(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like ``atomic_writer`` for code that writes by file name (``safetensors.torch.save_file``,
    ``Image.save``): yields a temp path with the same suffix; renamed onto ``path`` on success."""
    path = Path(path)
    fd, tmp = _temp_in(path)
    os.close(fd)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def write_file_atomic(path: str | os.PathLike[str], src_path: str | os.PathLike[str]) -> Path:
    """Copy ``src_path`` to ``path`` atomically (the source is left in place)."""
    with atomic_writer(path) as f, open(src_path, "rb") as src:
        shutil.copyfileobj(src, f, _CHUNK)
    return Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileStore:
    """Paths and file operations under ``data_dir``. Ids are ints, so paths cannot escape."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)

    @property
    def db_path(self) -> Path:
        return self.root / "loraforge.db"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def inputs_dir(self) -> Path:
        return self.root / "inputs"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def private_dirs(self) -> tuple[Path, ...]:
        """Folders only the bot's own user may enter: users' images and captions (datasets, snapshots),
        their uploaded LoRAs and pair images (inputs), worker logs (prompts, paths). Job folders are not
        here on purpose: results get the umask's modes, so an A1111 or ComfyUI running as another user can
        load them (trainer/atomic.py)."""
        return (self.datasets_dir, self.snapshots_dir, self.inputs_dir, self.logs_dir)

    def ensure_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for d in self.private_dirs():
            d.mkdir(mode=0o700, exist_ok=True)
            d.chmod(0o700)  # also an older data folder made with the umask's 755
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    # ---- datasets --------------------------------------------------------------------------

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.datasets_dir / str(int(dataset_id))

    def image_path(self, dataset_id: int, sha256: str, ext: str) -> Path:
        # Both parts come from our own intake, but a bad value must never become a path component.
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        ext = ext.lower().lstrip(".")
        if not _EXT_RE.match(ext):
            raise ValueError(f"bad file extension: {ext!r}")
        return self.dataset_dir(dataset_id) / f"{sha256}.{ext}"

    def write_image(self, dataset_id: int, sha256: str, ext: str, data: bytes) -> Path:
        """Store image bytes under their hash (idempotent: the same bytes give the same file)."""
        path = self.image_path(dataset_id, sha256, ext)
        if not path.exists():
            write_bytes_atomic(path, data)  # mkstemp's 600: a user's image is theirs only
        return path

    def remove_image(self, dataset_id: int, sha256: str, ext: str) -> None:
        self.image_path(dataset_id, sha256, ext).unlink(missing_ok=True)

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    def snapshot_dir(self, dataset_id: int, digest: str) -> Path:
        """A frozen copy of a dataset (images hardlinked, captions as .txt) that train jobs read."""
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise ValueError(f"not a hex digest: {digest!r}")
        return self.snapshots_dir / f"{int(dataset_id)}-{digest}"

    def dataset_snapshots(self, dataset_id: int) -> list[Path]:
        return sorted(self.snapshots_dir.glob(f"{int(dataset_id)}-*"))

    def remove_dataset_files(self, dataset_id: int) -> None:
        """The images and every snapshot of them (hardlinks: the bytes are gone only when both are)."""
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)
        for snap in self.dataset_snapshots(dataset_id):
            shutil.rmtree(snap, ignore_errors=True)

    # ---- jobs ------------------------------------------------------------------------------

    def job_dir(self, job_id: int) -> Path:
        return self.jobs_dir / str(int(job_id))

    def job_spec_path(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "spec.toml"

    def job_state_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "state"

    def job_samples_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "samples"

    def job_outputs_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "outputs"

    def job_events_path(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "events.jsonl"

    def make_job_dirs(self, job_id: int) -> Path:
        for d in (self.job_state_dir(job_id), self.job_samples_dir(job_id), self.job_outputs_dir(job_id)):
            d.mkdir(parents=True, exist_ok=True)
        return self.job_dir(job_id)

    def remove_job_files(self, job_id: int) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def relative(self, path: str | os.PathLike[str]) -> str:
        """Path as stored in the database (relative to data_dir, POSIX separators)."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def resolve(self, stored: str) -> Path:
        """Inverse of ``relative``; refuses stored paths that point outside data_dir."""
        p = (self.root / stored).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"stored path {stored!r} points outside the data directory")
        return p
