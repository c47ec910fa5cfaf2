"""The rows storage hands out: job/dataset/image/artifact/event dataclasses, the lifecycle table, and the
errors ``Repo`` raises. Plain data, importable without a database (``storage.repo`` re-exports them)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

JobKind = Literal["train", "merge", "preview"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Visibility = Literal["private", "shared"]
ArtifactKind = Literal["lora", "checkpoint", "sample", "grid", "plot", "state", "image"]

JOB_KINDS: frozenset[str] = frozenset({"train", "merge", "preview"})
JOB_STATES: frozenset[str] = frozenset({"queued", "running", "succeeded", "failed", "cancelled"})
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ARTIFACT_KINDS: frozenset[str] = frozenset({"lora", "checkpoint", "sample", "grid", "plot", "state", "image"})
VISIBILITIES: frozenset[str] = frozenset({"private", "shared"})

# Legal lifecycle moves. running -> queued is restart recovery (the job resumes from its saved state).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class NotFoundError(LookupError):
    """No row with that id."""


class IllegalTransitionError(ValueError):
    """A job state change the lifecycle does not allow (e.g. succeeded -> running)."""

    def __init__(self, job_id: int, current: str, wanted: str) -> None:
        super().__init__(f"job {job_id}: cannot go from {current!r} to {wanted!r}")
        self.job_id, self.current, self.wanted = job_id, current, wanted


class DuplicateNameError(ValueError):
    """The owner already has a dataset with that name (names are case-insensitive)."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    is_admin: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class Dataset:
    id: int
    owner_id: int
    name: str
    trigger_word: str
    class_prompt: str
    visibility: str
    created_at: float


@dataclass(frozen=True, slots=True)
class DatasetImage:
    id: int
    dataset_id: int
    sha256: str
    original_name: str
    ext: str
    bytes: int
    width: int
    height: int
    caption: str | None
    created_at: float
    mask_sha256: str | None = None  # its loss mask (masked loss), stored as <mask_sha256>.<mask_ext>
    mask_ext: str | None = None
    mask_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    owner_id: int
    guild_id: int | None
    channel_id: int | None
    thread_id: int | None
    message_id: int | None
    spec_json: str
    state: str
    progress_json: str | None
    error: str | None
    priority: int
    attempts: int
    worker_id: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    gpu_seconds: float

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json)

    @property
    def progress(self) -> dict[str, Any] | None:
        return json.loads(self.progress_json) if self.progress_json else None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class Artifact:
    id: int
    job_id: int
    kind: str
    path: str
    bytes: int
    sha256: str | None
    created_at: float
    meta_json: str | None

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_json) if self.meta_json else {}


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: int
    job_id: int
    ts: float
    type: str
    payload_json: str

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)


class NewImage(Protocol):
    """What ``add_images`` needs; ``storage.intake.AcceptedImage`` fits."""

    name: str
    sha256: str
    ext: str
    bytes: int
    width: int
    height: int
    caption: str | None


def _row_to(cls: type, row: sqlite3.Row) -> Any:
    kwargs = {f: row[f] for f in cls.__dataclass_fields__}
    return cls(**kwargs)


def _user(row: sqlite3.Row) -> User:
    return User(id=row["id"], name=row["name"], is_admin=bool(row["is_admin"]), created_at=row["created_at"])


def _job(row: sqlite3.Row) -> Job:
    kwargs = {f: row[f] for f in Job.__dataclass_fields__}
    kwargs["cancel_requested"] = bool(kwargs["cancel_requested"])
    return Job(**kwargs)


def _is_rowid(value: Any) -> bool:
    """A value SQLite can look up as a rowid (64-bit signed int)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _select_all(table: str, where: Sequence[str]) -> str:
    """``SELECT *`` from ``table`` with the conditions in ``where`` joined by AND (none: every row)."""
    return f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")


def _placeholders(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


_UNSET: Any = object()  # "not given" for optional updates (None is a value)
