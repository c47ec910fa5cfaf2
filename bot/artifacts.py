"""Recording what a job wrote: each engine ``sample``/``file`` event becomes an artifact row (size, sha256),
once per content, with paths kept relative to the data dir where they can be."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

from storage.files import FileStore
from storage.repo import ARTIFACT_KINDS, Repo

log = logging.getLogger("bot.scheduler")


def _file_info(path: Path) -> tuple[int, str | None]:
    """(bytes, sha256) of a file; directories count their bytes and have no hash. Blocking."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


async def record_artifact(repo: Repo, files: FileStore, job_id: int, ev: dict[str, Any]) -> None:
    """Store the file an engine event names (hashing happens off the event loop)."""
    kind = "sample" if ev.get("type") == "sample" else str(ev.get("kind") or "")
    raw = ev.get("path")
    if kind == "state" or not raw:
        return  # resume state is internal, rewritten every N steps; not a deliverable
    if kind not in ARTIFACT_KINDS:
        log.warning("job %s: unknown artifact kind %r (%s)", job_id, kind, raw)
        return
    path = Path(raw)
    try:
        size, sha = await asyncio.to_thread(_file_info, path)
    except OSError as e:
        log.warning("job %s: artifact %s unreadable: %s", job_id, path, e)
        return
    try:
        stored = files.relative(path)
    except ValueError:
        stored = str(path)  # outside data_dir (e.g. a models folder); keep it absolute
    meta = {k: v for k, v in ev.items() if k not in ("type", "kind", "path")}
    if meta.get("role") == "best":  # each new best LoRA overwrites the last: one row, its bytes counted once
        await repo.drop_artifacts(job_id, stored)
    # A resumed run may write the same file again: keep one row per content.
    for a in await repo.list_artifacts(job_id, kind):
        if a.path == stored and a.sha256 == sha:
            return
    await repo.add_artifact(job_id, kind, stored, size, sha, meta or None)  # type: ignore[arg-type]
