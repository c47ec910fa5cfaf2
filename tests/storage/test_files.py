"""Atomic writes and the file store layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from storage.db import Database
from storage.files import (
    FileStore,
    atomic_path,
    atomic_writer,
    sha256_file,
    write_bytes_atomic,
    write_file_atomic,
)
from storage.repo import Repo


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_bytes_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    write_bytes_atomic(target, b"one")
    write_bytes_atomic(target, b"two two")
    assert target.read_bytes() == b"two two"
    assert _leftovers(target.parent) == ["a.bin"]


def test_atomic_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"x" * 100_000)
        raise RuntimeError("disk on fire mid-write")
    assert not target.exists()
    assert _leftovers(tmp_path) == []  # temp file cleaned up too


def test_atomic_writer_exception_keeps_old_version(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt), atomic_writer(target) as f:
        f.write(b"new but partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["state.bin"]


def test_atomic_path_keeps_suffix_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "grid.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    with pytest.raises(ValueError), atomic_path(tmp_path / "other.png") as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert _leftovers(tmp_path) == ["grid.png"]


def test_write_file_atomic_and_sha(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 1000)
    dst = write_file_atomic(tmp_path / "out" / "dst.bin", src)
    assert dst.read_bytes() == src.read_bytes()
    assert sha256_file(dst) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_paths_follow_the_layout_and_refuse_bad_parts(tmp_path: Path) -> None:
    fs = FileStore(tmp_path)
    sha = "ab" * 32
    assert fs.image_path(3, sha, "PNG") == tmp_path / "datasets" / "3" / f"{sha}.png"
    assert fs.job_outputs_dir(7) == tmp_path / "jobs" / "7" / "outputs"
    assert fs.job_events_path(7).name == "events.jsonl" and fs.job_spec_path(7).name == "spec.toml"
    with pytest.raises(ValueError):
        fs.image_path(3, "../../etc/passwd", "png")
    with pytest.raises(ValueError):
        fs.image_path(3, sha, "png/../../x")
    assert fs.relative(fs.job_outputs_dir(7) / "a.safetensors") == "jobs/7/outputs/a.safetensors"
    with pytest.raises(ValueError):
        fs.resolve("../outside")


async def test_deleting_dataset_and_job_removes_files(tmp_path: Path, repo: Repo, db: Database) -> None:
    fs = FileStore(tmp_path / "data")
    ds = await repo.create_dataset(1, "cats")
    sha = hashlib.sha256(b"img").hexdigest()
    path = fs.write_image(ds.id, sha, "png", b"img")
    await repo.add_image(ds.id, sha, "a.png", "png", 3, 64, 64)
    other = await repo.create_dataset(1, "dogs")
    other_path = fs.write_image(other.id, sha, "png", b"img")

    assert await repo.delete_dataset(ds.id)
    fs.remove_dataset_files(ds.id)
    assert not path.exists() and not fs.dataset_dir(ds.id).exists()
    assert other_path.exists()  # only that dataset's files go

    job = await repo.create_job("train", 1, "{}")
    fs.make_job_dirs(job.id)
    write_bytes_atomic(fs.job_outputs_dir(job.id) / "x.safetensors", b"w")
    await repo.update_job_state(job.id, "cancelled")
    assert await repo.delete_job(job.id)
    fs.remove_job_files(job.id)
    assert not fs.job_dir(job.id).exists()
    fs.remove_job_files(job.id)  # idempotent


def test_dataset_snapshots_go_with_the_dataset(tmp_path: Path) -> None:
    fs = FileStore(tmp_path)
    one = fs.snapshot_dir(1, "ab" * 8)
    eleven = fs.snapshot_dir(11, "cd" * 8)
    for d in (one, eleven):
        d.mkdir(parents=True)
        (d / "x.png").write_bytes(b"img")
    assert fs.dataset_snapshots(1) == [one]  # not 11's
    fs.remove_dataset_files(1)
    assert not one.exists() and (eleven / "x.png").exists()
    with pytest.raises(ValueError):
        fs.snapshot_dir(1, "../../etc")
