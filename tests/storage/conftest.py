from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.db import Database, open_db
from storage.repo import Repo


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await open_db(tmp_path / "loraforge.db")
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def repo(db: Database) -> Repo:
    return Repo(db)
