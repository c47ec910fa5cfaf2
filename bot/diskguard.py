"""The total-disk guard: stop starting jobs (and taking uploads) before the data folder's disk fills.

A training job writes checkpoints, states and samples; several at once can fill a disk, and a full disk
corrupts more than it stops (half-written states, a database that cannot commit). Below
``limits.min_free_disk_mib`` free, the scheduler starts nothing new (running jobs go on), uploads are
refused, and admins see why in the log and in ``/admin status``. It resumes by itself once space is freed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("loraforge.disk")
MiB = 1024 * 1024


class DiskGuard:
    def __init__(self, path: Path, min_free_mib: float, free_bytes: Callable[[Path], int] | None = None) -> None:
        self.path = Path(path)
        self.min_free = int(min_free_mib * MiB)
        self._free_bytes = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self.notice: str | None = None  # set while low: the admin notice

    def free(self) -> int | None:
        try:
            return int(self._free_bytes(self.path))
        except OSError:
            return None

    def check(self) -> str | None:
        """The admin notice while the disk is low (logged once per episode), None when there is room."""
        if self.min_free <= 0:
            return None
        free = self.free()
        if free is None or free >= self.min_free:
            if self.notice is not None:
                log.warning("disk space is back (%.0f MiB free): dispatch resumes", (free or 0) / MiB)
            self.notice = None
            return None
        notice = (f"Low disk: {free / MiB:.0f} MiB free under {self.path}, below limits.min_free_disk_mib = "
                  f"{self.min_free / MiB:.0f}. No new job starts and uploads are refused until space is freed "
                  "(delete old jobs with /job delete, or datasets).")
        if self.notice is None:
            log.warning("%s", notice)
        self.notice = notice
        return notice
