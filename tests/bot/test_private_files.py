"""What stays private on this machine, whatever the umask: the database, the link secret, users' images,
captions, uploads and worker logs. Job results are the exception on purpose (umask modes, tests/trainer/test_atomic.py)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bot.config import config_from_dict
from bot.delivery import load_secret
from bot.service import Service
from storage.files import write_bytes_atomic


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buf, "PNG")
    return buf.getvalue()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 644, folders 755
    try:
        yield
    finally:
        os.umask(old)


async def test_database_secret_and_users_files_are_owner_only(tmp_path: Path, open_umask: None) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "datasets").mkdir(mode=0o755)  # a data folder from before: tightened at start
    svc = Service(config_from_dict({"paths": {"data_dir": str(data), "models_dir": str(tmp_path / "models")}}))
    await svc.open()
    try:
        up = await svc.create_dataset_from_files(7, "mine", [("a.png", _png((200, 10, 10))), ("a.txt", b"private")])
        spec = await svc.build_train_spec(7, up.dataset.id, {"steps": 3})
        secret = load_secret(None, None, data)
        uploaded = write_bytes_atomic(svc.files.inputs_dir / "loras" / ("0" * 64) / "x.safetensors", b"lora")
        assert mode(svc.files.db_path) == 0o600
        for suffix in ("-wal", "-shm"):
            side = svc.files.db_path.with_name(svc.files.db_path.name + suffix)
            if side.exists():
                assert mode(side) == 0o600, suffix
        assert secret and mode(data / "link_secret") == 0o600
        for d in svc.files.private_dirs():
            assert mode(d) == 0o700, d
        [image] = svc.files.dataset_dir(up.dataset.id).iterdir()
        assert mode(image) == 0o600
        assert Path(spec.concepts[0].image_dir).is_relative_to(svc.files.snapshots_dir)
        assert mode(uploaded) == 0o600
        # results stay readable by other local tools (A1111, ComfyUI): the jobs folder is not locked
        assert mode(svc.files.jobs_dir) == 0o755
    finally:
        await svc.stop()
