"""Service.build_train_spec: a dataset becomes a concept the engine trains the DreamBooth way."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from bot.config import config_from_dict
from bot.service import Service


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buf, "PNG")
    return buf.getvalue()


async def test_dataset_class_prompt_reaches_the_concept_for_prior_preservation(tmp_path: Path) -> None:
    svc = Service(config_from_dict({"paths": {"data_dir": str(tmp_path / "data"),
                                              "models_dir": str(tmp_path / "models")}}))
    await svc.open()
    try:
        up = await svc.create_dataset_from_files(
            7, "scs", [("a.png", _png((200, 10, 10))), ("a.txt", b"smiling"), ("b.png", _png((10, 10, 200)))],
            trigger_word="sks", class_prompt="girl")
        spec = await svc.build_train_spec(7, up.dataset.id, {"steps": 3}, "sd15-8gb")
        [concept] = spec.concepts
        assert concept.instance_prompt == "sks girl"
        assert concept.class_prompt == "girl"  # with the preset's class images per image: prior preservation
        assert spec.data.class_images_per_image > 0 and spec.prior_loss_weight == 1.0
        assert spec.data.trigger_word == "sks"
        captions = sorted(p.read_text() for p in Path(concept.image_dir).glob("*.txt"))
        assert captions == ["smiling"]  # the DB caption travels to the engine as a same-name .txt
    finally:
        await svc.stop()


async def test_deleting_the_last_job_that_names_an_upload_removes_it(tmp_path: Path) -> None:
    import json
    import os
    import time

    svc = Service(config_from_dict({"paths": {"data_dir": str(tmp_path / "data"),
                                              "models_dir": str(tmp_path / "models")}}))
    await svc.open()
    try:
        data = svc.files.root
        kept, orphan = data / "inputs/loras/aa/kept.safetensors", data / "inputs/loras/bb/orphan.safetensors"
        fresh = data / "inputs/pairs/fresh.png"
        for f in (kept, orphan, fresh):
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"x")
        old = time.time() - 7200
        for f in (kept, orphan):
            os.utime(f, (old, old))
        spec = {"kind": "merge", "inputs": [{"path": str(kept)}]}
        other = {"kind": "merge", "inputs": [{"path": str(orphan)}]}
        j1 = await svc.repo.create_job("merge", 7, '{"kind": "merge"}')
        j2 = await svc.repo.create_job("merge", 7, json.dumps(spec))
        j3 = await svc.repo.create_job("merge", 7, json.dumps(other))
        for j in (j1, j2, j3):
            await svc.repo.update_job_state(j.id, "cancelled")
        assert await svc.delete_job(j3.id)
        assert not orphan.exists() and not orphan.parent.exists()  # nobody names it any more
        assert kept.exists()  # job 2 still names it
        assert fresh.exists()  # too new: a command may be about to queue it
        assert not (data / "jobs" / str(j3.id)).exists()
    finally:
        await svc.stop()
