"""Connection pragmas and migrations against a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage.db import MIGRATIONS, SCHEMA_VERSION, Database, SchemaTooNewError, open_db
from storage.repo import Repo


def _columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


async def test_fresh_db_is_current_with_wal_and_foreign_keys(db: Database) -> None:
    assert await db.schema_version() == SCHEMA_VERSION == len(MIGRATIONS) >= 2
    assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
    assert (await db.fetchone("PRAGMA foreign_keys"))[0] == 1
    assert (await db.fetchone("PRAGMA busy_timeout"))[0] > 0
    tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "datasets", "images", "jobs", "artifacts", "job_events"} <= tables


async def test_reopen_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with Database(path) as d:
        await Repo(d).ensure_user(1, "a")
    async with Database(path) as d:
        assert await d.schema_version() == SCHEMA_VERSION
        assert (await Repo(d).get_user(1)).name == "a"


async def test_migrates_v1_database_with_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # A database as the first release left it: schema v1 only, with rows in it.
    old = await Database(path).connect(MIGRATIONS[:1])
    assert await old.schema_version() == 1
    async with old.transaction() as conn:
        await conn.execute("INSERT INTO users (id, name, created_at) VALUES (42, 'ann', 1.0)")
        await conn.execute(
            "INSERT INTO datasets (owner_id, name, trigger_word, class_prompt, created_at) "
            "VALUES (42, 'cats', 'scs', 'cat', 2.0)"
        )
        await conn.execute(
            "INSERT INTO images (dataset_id, sha256, original_name, ext, bytes, width, height, caption, created_at) "
            "VALUES (1, ?, 'a.png', 'png', 10, 64, 64, 'a cat', 3.0)",
            ("a" * 64,),
        )
        await conn.execute(
            "INSERT INTO jobs (kind, owner_id, spec_json, state, created_at) VALUES ('train', 42, '{}', 'queued', 4.0)"
        )
    await old.close()
    assert "priority" not in _columns(path, "jobs")

    async with Database(path) as new:
        assert await new.schema_version() == SCHEMA_VERSION
        repo = Repo(new)
        user = await repo.get_user(42)
        assert user is not None and user.name == "ann" and user.is_admin is False
        ds = await repo.find_dataset_by_name(42, "CATS")
        assert ds is not None and ds.trigger_word == "scs" and ds.visibility == "private"
        [img] = await repo.list_images(ds.id)
        assert img.caption == "a cat" and img.width == 64
        job = await repo.get_job(1)
        assert job is not None and job.state == "queued"
        assert (job.priority, job.gpu_seconds, job.cancel_requested, job.heartbeat_at) == (
            0,
            0.0,
            False,
            None,
        )
        # The new table works on the migrated database.
        await repo.add_event(job.id, "started", {"step": 0})
        assert [e.type for e in await repo.list_events(job.id)] == ["started"]
    assert {"priority", "heartbeat_at", "gpu_seconds", "cancel_requested"} <= _columns(path, "jobs")


async def test_failed_migration_rolls_back_and_keeps_version(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    await (await Database(path).connect(MIGRATIONS[:1])).close()
    broken = [*MIGRATIONS[:1], ("ALTER TABLE jobs ADD COLUMN half_done INTEGER", "THIS IS NOT SQL")]
    with pytest.raises(sqlite3.OperationalError):
        await Database(path).connect(broken)
    assert "half_done" not in _columns(path, "jobs")
    async with Database(path) as d:  # and the real migrations still apply afterwards
        assert await d.schema_version() == SCHEMA_VERSION


async def test_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNewError):
        await open_db(path)


async def test_transaction_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO users (id, name, created_at) VALUES (7, 'x', 0)")
            raise RuntimeError("boom")
    assert await db.fetchone("SELECT * FROM users WHERE id = 7") is None
