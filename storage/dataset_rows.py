"""Users, datasets and their images: the ``Repo`` methods for what a user uploads (a mixin of ``Repo``).

Same conventions as storage/repo.py: Unix-seconds floats, Discord ids as INTEGER, dataclass rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from storage.db import Database
from storage.records import (
    _UNSET,
    VISIBILITIES,
    Dataset,
    DatasetImage,
    DuplicateNameError,
    NewImage,
    NotFoundError,
    User,
    Visibility,
    _is_rowid,
    _placeholders,
    _row_to,
    _select_all,
    _user,
)


class DatasetRows:
    db: Database
    _clock: Any

    # ---- users -----------------------------------------------------------------------------

    async def ensure_user(self, user_id: int, name: str = "", *, is_admin: bool | None = None) -> User:
        """Create the user if missing; refresh the display name when one is given."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO users (id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = excluded.name WHERE excluded.name != ''",
                (user_id, name, self._now()),
            )
            if is_admin is not None:
                await conn.execute("UPDATE users SET is_admin = ? WHERE id = ?", (int(is_admin), user_id))
            async with conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)) as cur:
                row = await cur.fetchone()
        assert row is not None
        return _user(row)

    async def get_user(self, user_id: int) -> User | None:
        row = await self.db.fetchone("SELECT * FROM users WHERE id = ?", (user_id,))
        return _user(row) if row else None

    # ---- datasets --------------------------------------------------------------------------

    async def create_dataset(
        self,
        owner_id: int,
        name: str,
        trigger_word: str = "",
        class_prompt: str = "",
        visibility: Visibility = "private",
    ) -> Dataset:
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {sorted(VISIBILITIES)}, not {visibility!r}")
        async with self.db.transaction() as conn:
            # The owner row may not exist yet (first command of a new user): create it here so
            # callers cannot trip over the foreign key.
            await conn.execute(
                "INSERT OR IGNORE INTO users (id, name, created_at) VALUES (?, '', ?)",
                (owner_id, self._now()),
            )
            try:
                cur = await conn.execute(
                    "INSERT INTO datasets (owner_id, name, trigger_word, class_prompt, visibility, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (owner_id, name, trigger_word, class_prompt, visibility, self._now()),
                )
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise DuplicateNameError(f"you already have a dataset named {name!r}") from e
                raise
            async with conn.execute("SELECT * FROM datasets WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(Dataset, row)

    async def get_dataset(self, dataset_id: int) -> Dataset | None:
        if not _is_rowid(dataset_id):
            return None  # "#99999999999999999999" typed by hand: no such dataset (SQLite would overflow)
        row = await self.db.fetchone("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        return _row_to(Dataset, row) if row else None

    async def find_dataset_by_name(self, owner_id: int, name: str) -> Dataset | None:
        """Case-insensitive lookup among the owner's datasets."""
        row = await self.db.fetchone(
            "SELECT * FROM datasets WHERE owner_id = ? AND name = ?", (owner_id, name)
        )
        return _row_to(Dataset, row) if row else None

    async def list_datasets(
        self, *, visible_to: int | None = None, owner_id: int | None = None
    ) -> list[Dataset]:
        """``visible_to``: the user's own datasets plus everyone's shared ones. ``owner_id``: only
        that owner's. Neither: all (admin views)."""
        where, params = [], []
        if visible_to is not None:
            where.append("(owner_id = ? OR visibility = 'shared')")
            params.append(visible_to)
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        sql = _select_all("datasets", where)
        rows = await self.db.fetchall(sql + " ORDER BY name COLLATE NOCASE, id", params)
        return [_row_to(Dataset, r) for r in rows]

    async def update_dataset(
        self,
        dataset_id: int,
        *,
        trigger_word: str = _UNSET,
        class_prompt: str = _UNSET,
        visibility: Visibility = _UNSET,
        name: str = _UNSET,
    ) -> Dataset:
        changes: dict[str, Any] = {
            k: v
            for k, v in (
                ("trigger_word", trigger_word),
                ("class_prompt", class_prompt),
                ("visibility", visibility),
                ("name", name),
            )
            if v is not _UNSET
        }
        if "visibility" in changes and changes["visibility"] not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {sorted(VISIBILITIES)}, not {visibility!r}")
        async with self.db.transaction() as conn:
            if changes:
                sets = ", ".join(f"{k} = ?" for k in changes)
                try:
                    await conn.execute(
                        f"UPDATE datasets SET {sets} WHERE id = ?", (*changes.values(), dataset_id)
                    )
                except sqlite3.IntegrityError as e:
                    raise DuplicateNameError(f"you already have a dataset named {name!r}") from e
            async with conn.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)) as cur:
                row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"dataset {dataset_id} does not exist")
        return _row_to(Dataset, row)

    async def delete_dataset(self, dataset_id: int) -> bool:
        """Delete the row (images cascade). Remove the files afterwards with
        ``FileStore.remove_dataset_files``: orphaned files are harmless, rows without files are not."""
        return await self.db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)) > 0

    # ---- images ----------------------------------------------------------------------------

    async def add_image(
        self,
        dataset_id: int,
        sha256: str,
        original_name: str,
        ext: str,
        bytes: int,  # noqa: A002 - matches the column name
        width: int,
        height: int,
        caption: str | None = None,
    ) -> DatasetImage | None:
        """Insert one image; returns None when the dataset already holds these bytes."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO images (dataset_id, sha256, original_name, ext, bytes, width, height, caption, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dataset_id, sha256) DO NOTHING",
                (dataset_id, sha256, original_name, ext, bytes, width, height, caption, self._now()),
            )
            if cur.rowcount == 0:
                return None
            async with conn.execute("SELECT * FROM images WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(DatasetImage, row)

    async def add_images(self, dataset_id: int, images: Iterable[NewImage]) -> list[DatasetImage]:
        """Insert many in one transaction (an upload is all-or-nothing in the database).
        Images already in the dataset are skipped; returns the rows inserted."""
        now = self._now()
        ids: list[int] = []
        async with self.db.transaction() as conn:
            for im in images:
                cur = await conn.execute(
                    "INSERT INTO images (dataset_id, sha256, original_name, ext, bytes, width, height, "
                    "caption, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(dataset_id, sha256) DO NOTHING",
                    (dataset_id, im.sha256, im.name, im.ext, im.bytes, im.width, im.height, im.caption, now),
                )
                if cur.rowcount:
                    ids.append(int(cur.lastrowid or 0))
            rows: list[sqlite3.Row] = []
            if ids:
                async with conn.execute(
                    f"SELECT * FROM images WHERE id IN ({_placeholders(ids)}) ORDER BY id", ids
                ) as c:
                    rows = list(await c.fetchall())
        return [_row_to(DatasetImage, r) for r in rows]

    async def get_image(self, image_id: int) -> DatasetImage | None:
        row = await self.db.fetchone("SELECT * FROM images WHERE id = ?", (image_id,))
        return _row_to(DatasetImage, row) if row else None

    async def list_images(
        self, dataset_id: int, *, limit: int | None = None, offset: int = 0
    ) -> list[DatasetImage]:
        rows = await self.db.fetchall(
            "SELECT * FROM images WHERE dataset_id = ? ORDER BY id LIMIT ? OFFSET ?",
            (dataset_id, -1 if limit is None else limit, offset),
        )
        return [_row_to(DatasetImage, r) for r in rows]

    async def image_hashes(self, dataset_id: int) -> set[str]:
        """The sha256 set to pass to ``intake.ingest_uploads(existing_hashes=...)``."""
        rows = await self.db.fetchall("SELECT sha256 FROM images WHERE dataset_id = ?", (dataset_id,))
        return {r[0] for r in rows}

    async def count_images(self, dataset_id: int) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM images WHERE dataset_id = ?", (dataset_id,))
        return int(row[0]) if row else 0

    async def set_caption(self, image_id: int, caption: str | None) -> bool:
        return await self.db.execute("UPDATE images SET caption = ? WHERE id = ?", (caption, image_id)) > 0

    async def set_masks(self, dataset_id: int, masks: Iterable[tuple[str, str, str, int]]) -> int:
        """Give images their loss masks: (image sha256, mask sha256, mask ext, mask bytes) each, in one
        transaction; a later mask replaces an earlier one. Returns how many images got one."""
        n = 0
        async with self.db.transaction() as conn:
            for image_sha, mask_sha, ext, size in masks:
                cur = await conn.execute(
                    "UPDATE images SET mask_sha256 = ?, mask_ext = ?, mask_bytes = ? WHERE dataset_id = ? AND sha256 = ?",
                    (mask_sha, ext, size, dataset_id, image_sha))
                n += cur.rowcount
        return n

    async def delete_image(self, image_id: int) -> bool:
        return await self.db.execute("DELETE FROM images WHERE id = ?", (image_id,)) > 0
