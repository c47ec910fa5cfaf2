"""/resume: a cancelled (or failed, or finished) training job continues from the state it saved, as a new job.

A cancel makes the engine save the LoRA and its full resume state (weights, optimizer, schedule, RNG, data
position) before it stops. /resume queues a new job with the same settings (``steps`` may raise the total, as
`trainer train --steps` does on the command line) whose folder is seeded with that state, so the engine picks
up at the saved step. The new job records which job it continues (the ``continues`` event); its folder is
seeded when it starts, from the source job's state folder as it is then.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from bot.errors import InvalidInput
from storage.files import FileStore
from storage.repo import Job, Repo

CONTINUES_EVENT = "continues"


def saved_step(files: FileStore, job_id: int) -> int | None:
    """The step of the newest state the job saved (the engine's `state/step-<n>` folders; 0 when the state
    folder holds something else), or None when it saved none."""
    root = files.job_state_dir(job_id)
    if not root.is_dir():
        return None
    steps = [int(p.name.split("-")[1]) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name.split("-")[1].isdigit()]
    if steps:
        return max(steps)
    return 0 if any(not p.name.startswith(".") for p in root.iterdir()) else None


def continued_spec(job: Job, saved: int | None, steps: int | None) -> dict[str, Any]:
    """The spec the continuing job runs, or InvalidInput saying why this job cannot continue."""
    if job.kind != "train":
        raise InvalidInput(f"Job #{job.id} is a {job.kind} job; only training jobs continue from a saved state.",
                           f"Run it again with `/retrain {job.id}`.")
    if not job.is_terminal:
        raise InvalidInput(f"Job #{job.id} is still {job.state}.",
                           f"Cancel it with `/cancel {job.id}` (its state is saved), then `/resume {job.id}`.")
    if saved is None:
        raise InvalidInput(f"Job #{job.id} saved no training state to continue from (it stopped before its "
                           "first step, or its files were deleted).", f"Start it again with `/retrain {job.id}`.")
    spec = json.loads(job.spec_json)
    total = int(spec.get("steps") or 0)
    if steps is not None:
        if steps <= saved:
            raise InvalidInput(f"`steps` must be more than the {saved} steps job #{job.id} already trained.",
                               f"Give `steps` above {saved}, or leave it out to finish its {total} steps.")
        spec["steps"] = steps
    elif job.state == "succeeded" or saved >= total:
        raise InvalidInput(f"Job #{job.id} already trained all its {total} steps.",
                           f"Give `steps` (more than {total}) to train it further.")
    return spec


async def continues_from(repo: Repo, job_id: int) -> int | None:
    """The job this one continues (its ``continues`` event), if any."""
    events = await repo.list_events(job_id, types=[CONTINUES_EVENT], limit=1)
    return int(events[0].payload["job_id"]) if events else None


def _link_or_copy(src: str, dst: str) -> None:
    # The engine never rewrites a saved state in place (it writes a new folder and renames it), so the new job
    # may share the old job's files: a hard link costs no space where the filesystem allows one.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def seed_state(files: FileStore, source_id: int, job_id: int) -> None:
    """Put the source job's saved state into this job's state folder, unless this job has its own already
    (a continuing job that was itself interrupted resumes from its own, newer state). Blocking."""
    dst = files.job_state_dir(job_id)
    if dst.is_dir() and any(dst.iterdir()):
        return
    src = files.job_state_dir(source_id)
    if saved_step(files, source_id) is None:
        raise FileNotFoundError(f"the saved state of job #{source_id} is gone (was the job deleted?)")
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name.startswith("."):
            continue  # a half-written state
        tmp = dst / f".seed-{entry.name}"
        if entry.is_dir():
            shutil.copytree(entry, tmp, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(tmp))
        os.replace(tmp, dst / entry.name)  # whole entries only: the engine never sees half of one

