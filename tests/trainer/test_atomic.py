"""The engine's one atomic writer: whole file or old file, never a part; results readable by other users."""

import os
import stat
from pathlib import Path

import pytest

from trainer import atomic


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "lora.safetensors"
    atomic.write_bytes(target, b"old")

    def broken(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora.safetensors"]


def test_files_get_the_umask_mode_not_mkstemps_600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic.write_text(tmp_path / "a.txt", "hi")
        with atomic.open_atomic(tmp_path / "b.bin") as f:
            f.write(b"x")
        with atomic.folder_atomic(tmp_path / "state") as d:
            (d / "x.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o755
    assert (tmp_path / "state" / "x.json").read_text() == "{}"


def test_folder_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    with atomic.folder_atomic(tmp_path / "s") as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.folder_atomic(tmp_path / "s") as d:
        (d / "b").write_text("2")
        raise RuntimeError("crash mid-save")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    with atomic.folder_atomic(tmp_path / "s") as d:
        (d / "c").write_text("3")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["c"]


def test_folder_cache_keeps_what_another_builder_put_there_first(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    with atomic.folder_atomic(target, replace=False) as tmp:
        (tmp / "a.json").write_text("first")
    with atomic.folder_atomic(target, replace=False) as tmp:
        (tmp / "a.json").write_text("second")  # a concurrent builder finishing later
    assert (target / "a.json").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # its temporary folder is gone
