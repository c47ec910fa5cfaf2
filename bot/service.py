"""The bot's services in one bundle: config, database, repo, file store and scheduler.

The Discord bot and the console demo both build a ``Service`` and ``await service.start()``. It
also holds the few operations that need several parts at once (an upload goes through intake, the
file store and the repo; a training spec needs the dataset materialised on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import Config, load_config
from bot.quotas import fit_storage
from bot.scheduler import Listener, QuotaError, Scheduler
from storage import retention, usage
from storage.db import Database, open_db
from storage.files import FileStore
from storage.intake import IntakeResult, ingest_uploads
from storage.masks import MASKS_DIR, write_masks
from storage.names import display_text
from storage.repo import Dataset, DatasetImage, Job, NotFoundError, Repo
from trainer.spec import SpecError, TrainSpec, deep_merge, resolve_job

__all__ = ["DatasetUpload", "QuotaError", "Service", "SpecError"]

log = logging.getLogger(__name__)
MAINTENANCE_S = 3600.0  # retention pass: event compaction and the sweep of unused uploads


@dataclass
class DatasetUpload:
    """What an upload did: the dataset, the rows added, and what was refused or skipped."""

    dataset: Dataset
    accepted: list[DatasetImage] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    duplicates: list[str] = field(default_factory=list)
    intake: IntakeResult | None = None

    def summary(self) -> str:
        return self.intake.summary() if self.intake else f"Added {len(self.accepted)} image(s)."


class Service:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or load_config(None)
        self.files = FileStore(self.config.data_dir)
        self.db: Database | None = None
        self._repo: Repo | None = None
        self._scheduler: Scheduler | None = None
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def repo(self) -> Repo:
        if self._repo is None:
            raise RuntimeError("Service is not started; await service.open() or start() first")
        return self._repo

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("Service is not started; await service.open() or start() first")
        return self._scheduler

    async def open(self) -> Service:
        """Database, repo and scheduler, without starting workers (tools and tests use this)."""
        if self.db is None:
            await asyncio.to_thread(self.files.ensure_dirs)
            self.db = await open_db(self.files.db_path)
            self._repo = Repo(self.db)
            self._scheduler = Scheduler(self._repo, self.files, self.config)
        return self

    async def start(self) -> Service:
        """Open everything, recover jobs interrupted by a crash, start the workers."""
        await self.open()
        await self.scheduler.start()
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain(), name="maintenance")
        return self

    async def maintain_once(self) -> None:
        """Retention (storage/retention.py): compact finished jobs' events, remove uploads no job names."""
        await retention.compact_finished_jobs(self.repo.db)
        await self.sweep_inputs()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_S)
            try:
                await self.maintain_once()
            except Exception:  # noqa: BLE001 - housekeeping must never stop the bot
                log.exception("maintenance failed")

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- shortcuts ----------------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> Any:
        return self.scheduler.add_listener(fn)

    async def submit_train(
        self,
        owner_id: int,
        dataset_id: int,
        overrides: dict[str, Any] | None = None,
        preset: str | None = None,
        *,
        guild_id: int | None = None,
        channel_id: int | None = None,
        is_admin: bool = False,
        priority: int = 0,
    ) -> Job:
        """build_train_spec + scheduler.submit in one call (what /train does)."""
        spec = await self.build_train_spec(owner_id, dataset_id, overrides, preset)
        return await self.scheduler.submit(
            owner_id, "train", spec, guild_id, channel_id, priority=priority, is_admin=is_admin
        )

    # ---- datasets -----------------------------------------------------------------------------

    async def create_dataset_from_files(
        self,
        owner_id: int,
        name: str,
        files: list[tuple[str, bytes]],
        trigger_word: str = "",
        class_prompt: str = "",
    ) -> DatasetUpload:
        """Create a dataset (DuplicateNameError if the owner has one by that name) and add files."""
        # Stored and echoed (and put into prompts): no control or bidi characters, bounded.
        ds = await self.repo.create_dataset(owner_id, display_text(name), display_text(trigger_word),
                                            display_text(class_prompt, 200))
        return await self.add_files(ds.id, files)

    async def add_files(self, dataset_id: int, files: list[tuple[str, bytes]]) -> DatasetUpload:
        """Check uploads (off the event loop), store accepted images by hash, then insert rows.
        Files are written before rows: a crash leaves at worst an orphan file, never a row
        pointing at nothing."""
        ds = await self.repo.get_dataset(dataset_id)
        if ds is None:
            raise NotFoundError(f"dataset {dataset_id} does not exist")
        rows = await self.repo.list_images(dataset_id)  # masks may pair with images already stored
        existing = {r.sha256 for r in rows}
        result = await asyncio.to_thread(
            ingest_uploads, files, self.config.limits.intake_limits(), existing, rows
        )
        used = (await usage.storage_usage(self.repo.db, ds.owner_id)).total_bytes
        fit_storage(result, used, int(self.config.limits.max_storage_mib_per_user * 1024 * 1024),
                    self.scheduler.disk.check())

        def write_all() -> None:
            for im in [*result.accepted, *result.masks]:
                self.files.write_image(dataset_id, im.sha256, im.ext, im.data)

        await asyncio.to_thread(write_all)
        rows = await self.repo.add_images(dataset_id, result.accepted)
        await self.repo.set_masks(dataset_id, [(m.image_sha256, m.sha256, m.ext, m.bytes) for m in result.masks])
        return DatasetUpload(ds, rows, list(result.rejected), list(result.duplicates), result)

    async def jobs_using_dataset(self, dataset_id: int) -> list[Job]:
        """Queued or running jobs that train on a snapshot of the dataset (they would lose their images)."""
        snaps = [str(p.resolve()) for p in await asyncio.to_thread(self.files.dataset_snapshots, dataset_id)]
        out = []
        for job in await self.repo.list_jobs(states=["queued", "running"]):
            dirs = [str(c.get("image_dir", "")) for c in job.spec.get("concepts") or [] if isinstance(c, dict)]
            if any(d == s or d.startswith(s + os.sep) for d in dirs for s in snaps):
                out.append(job)
        return out

    async def delete_dataset(self, dataset_id: int) -> bool:
        """The rows (images cascade), then the images and their snapshots on disk. Jobs that already
        ran keep their results; a later /retrain of one says the dataset folder is gone."""
        deleted = await self.repo.delete_dataset(dataset_id)
        await asyncio.to_thread(self.files.remove_dataset_files, dataset_id)
        await self.sweep_inputs()
        return deleted

    async def delete_job(self, job_id: int) -> bool:
        """A finished job's rows and files, then the uploaded inputs no remaining job refers to."""
        deleted = await self.repo.delete_job(job_id)
        await asyncio.to_thread(self.files.remove_job_files, job_id)
        await self.sweep_inputs()
        return deleted

    async def sweep_inputs(self, min_age_s: float = 3600.0) -> list[Path]:
        """Remove uploaded LoRAs and pair images (data_dir/inputs/, shared by content hash) that no job's spec
        names any more. Files younger than `min_age_s` stay: a command may have stored them and not yet queued."""
        texts = [json.dumps(job.spec) for job in await self.repo.list_jobs()]
        root = self.files.root / "inputs"

        def sweep() -> list[Path]:
            removed: list[Path] = []
            if not root.is_dir():
                return removed
            now = time.time()
            for f in sorted(root.rglob("*")):
                if not f.is_file() or now - f.stat().st_mtime < min_age_s:
                    continue
                names = {str(f), str(f.resolve()), str(f.relative_to(self.files.root))}
                if not any(n in t for t in texts for n in names):
                    f.unlink(missing_ok=True)
                    removed.append(f)
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
            return removed

        return await asyncio.to_thread(sweep)

    # ---- training specs -----------------------------------------------------------------------

    def _snapshot(self, ds: Dataset, images: list[DatasetImage]) -> Path:
        """A read-only folder the engine trains from: each image (hardlinked) beside a same-name
        .txt holding its caption from the database. Named by a hash of its content, so it never
        changes once written: a resumed or retrained job sees exactly the data of the first run,
        and the engine's dataset fingerprint (which includes paths) stays valid across restarts."""
        h = hashlib.sha256()
        for im in images:
            h.update(f"{im.sha256}.{im.ext}\0{im.caption or ''}\n".encode())
            if im.mask_sha256:  # only then: snapshots of mask-free datasets keep their names
                h.update(f"mask {im.mask_sha256}.{im.mask_ext}\n".encode())
        folder = self.files.snapshot_dir(ds.id, h.hexdigest()[:16])
        if (folder / ".complete").exists():
            return folder
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for im in images:
            src = self.files.image_path(ds.id, im.sha256, im.ext)
            dst = tmp / src.name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            if im.caption:
                (tmp / f"{im.sha256}.txt").write_text(im.caption, encoding="utf-8")
        if any(im.mask_sha256 for im in images):
            write_masks(tmp / MASKS_DIR, images, lambda sha, ext: self.files.image_path(ds.id, sha, ext))
        (tmp / ".complete").write_text(json.dumps({"dataset_id": ds.id, "images": len(images)}))
        try:
            os.replace(tmp, folder)  # atomic publish; a concurrent builder of the same content may win
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    async def build_train_spec(
        self,
        owner_id: int,
        dataset_id: int,
        overrides: dict[str, Any] | None = None,
        preset: str | None = None,
    ) -> TrainSpec:
        """A fully resolved TrainSpec training on the dataset (the owner's, or a shared one).

        The concept's image_dir is a content-addressed snapshot of the dataset; the trigger word
        goes to data.trigger_word (first in every caption) and, with the class prompt, into the
        instance prompt. ``overrides`` are spec fields (nested dicts) applied over the preset.
        """
        ds = await self.repo.get_dataset(dataset_id)
        if ds is None:
            raise NotFoundError(f"dataset {dataset_id} does not exist")
        if ds.owner_id != owner_id and ds.visibility != "shared":
            raise PermissionError(f"dataset {ds.name!r} belongs to someone else and is not shared")
        images = await self.repo.list_images(dataset_id)
        if not images:
            raise SpecError([("dataset", f"dataset {ds.name!r} has no images; upload some first")])
        folder = await asyncio.to_thread(self._snapshot, ds, images)
        instance = " ".join(p for p in (ds.trigger_word.strip(), ds.class_prompt.strip()) if p)
        base: dict[str, Any] = {
            "kind": "train",
            "concepts": [{"image_dir": str(folder.resolve()), "instance_prompt": instance,
                          "class_prompt": ds.class_prompt.strip() or None}],
        }
        if (folder / MASKS_DIR).is_dir() and (overrides or {}).get("masked_loss") is not False:
            base["masked_loss"] = True  # uploaded masks are used unless the job turns masked_loss off
            base["concepts"][0]["mask_dir"] = str((folder / MASKS_DIR).resolve())
        if ds.trigger_word.strip():
            base["data"] = {"trigger_word": ds.trigger_word.strip()}
        values = deep_merge(base, overrides or {})
        spec = resolve_job(values, preset)
        assert isinstance(spec, TrainSpec)
        return spec

    # ---- job files ----------------------------------------------------------------------------

    async def artifact_paths(self, job_id: int, kind: str | None = None) -> list[Path]:
        """Absolute paths of a job's recorded artifacts (optionally one kind), oldest first."""
        out = []
        for a in await self.repo.list_artifacts(job_id, kind):
            p = Path(a.path)
            out.append(p if p.is_absolute() else self.files.resolve(a.path))
        return out
