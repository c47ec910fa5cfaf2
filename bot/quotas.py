"""The daily device-time quota, checked again when a job is about to start (not only at submit).

Submit only sees what has run so far, so ``max_queued_per_user`` jobs of ``max_steps`` each could all get
in under the quota and then run far past it. At dispatch a job is priced: its cost in units (training
steps x batch x (resolution/512)^2; one unit per merge or preview) divided by the units per device second
that recent jobs of its kind actually achieved here. Then, against ``limits.daily_gpu_minutes_per_user``:

- what the owner used in the last 24 h (device time of finished attempts and the elapsed time of running
  ones) + what their running jobs still need + this job's price fits: it starts;
- it does not fit now: it waits in the queue (one ``quota_wait`` event says why and until when) and starts
  by itself once old usage leaves the 24 h window;
- the job alone costs more than the whole quota: it is cancelled with a message saying so.

Without history for a kind the price is unknown (0): the job starts while the owner is under quota.
Admins' jobs (marked ``quota_exempt`` at submit) are never held.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from bot.config import Config
from storage import queries, usage
from storage.intake import IntakeResult
from storage.repo import Job, Repo

DAY_S = 24 * 3600.0
EXEMPT_EVENT = "quota_exempt"
WAIT_EVENT = "quota_wait"


def cost_units(kind: str, spec: dict[str, Any]) -> float:
    """The work in a job, in units whose device time scales alike (for pricing from history)."""
    if kind != "train":
        return 1.0
    steps = float(spec.get("steps") or 0)
    batch = float(spec.get("batch_size") or 1)
    res = float((spec.get("data") or {}).get("resolution") or 512)
    return max(1.0, steps * batch * (res / 512.0) ** 2)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["go", "wait", "refuse"]
    message: str = ""


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    m = seconds / 60
    return f"{m:.0f} min" if m < 120 else f"{m / 60:.1f} h"


class QuotaGate:
    def __init__(self, repo: Repo, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.repo = repo
        self.config = config
        self._clock = clock

    async def units_per_second(self, kind: str) -> float | None:
        runs = await usage.recent_runs(self.repo.db, kind)
        units = secs = 0.0
        for spec_json, gpu_s in runs:
            try:
                spec = json.loads(spec_json)
            except ValueError:
                continue
            units += cost_units(kind, spec if isinstance(spec, dict) else {})
            secs += gpu_s
        return units / secs if units > 0 and secs > 0 else None

    async def price_s(self, job: Job, rates: dict[str, float | None] | None = None) -> float:
        """Estimated device seconds for the whole job (0 when nothing of its kind has run yet)."""
        return await self.price_spec_s(job.kind, job.spec, rates)

    async def price_spec_s(self, kind: str, spec: dict[str, Any], rates: dict[str, float | None] | None = None) -> float:
        rates = {} if rates is None else rates
        if kind not in rates:
            rates[kind] = await self.units_per_second(kind)
        rate = rates[kind]
        return cost_units(kind, spec) / rate if rate else 0.0

    async def too_big(self, kind: str, spec: dict[str, Any]) -> str | None:
        """The refusal for a job that alone costs more than the whole daily quota (None: it may queue)."""
        quota = self.config.limits.daily_gpu_minutes_per_user * 60
        price = await self.price_spec_s(kind, spec) if quota > 0 else 0.0
        if price <= quota:
            return None
        return (f"This {kind} job would need about {_span(price)} of GPU time, more than your whole daily "
                f"quota of {_span(quota)}; queue it again with fewer steps or a lower resolution.")

    async def verdict(self, job: Job) -> Verdict:
        quota = self.config.limits.daily_gpu_minutes_per_user * 60
        if quota <= 0 or await usage.has_event(self.repo.db, job.id, EXEMPT_EVENT):
            return Verdict("go")
        rates: dict[str, float | None] = {}
        if refusal := await self.too_big(job.kind, job.spec):
            return Verdict("refuse", refusal)
        price = await self.price_s(job, rates)
        now = self._clock()
        used = await self.repo.gpu_seconds_since(job.owner_id, now - DAY_S)
        pending = 0.0  # what the owner's running jobs will still use
        for r in await self.repo.list_jobs(job.owner_id, ["running"]):
            if r.id != job.id:
                elapsed = max(0.0, now - (r.started_at or now))
                pending += max(0.0, await self.price_s(r, rates) - elapsed)
        if used + pending + price <= quota or (price == 0 and used + pending < quota):
            return Verdict("go")
        oldest = await queries.quota_window_start(self.repo.db, job.owner_id, now - DAY_S)
        frees = (oldest or now) + DAY_S
        when = dt.datetime.fromtimestamp(frees, dt.UTC).strftime("%H:%M UTC")
        need = f", and this job needs about {_span(price)}" if price else ""
        return Verdict("wait", (
            f"Waiting for GPU quota: you have used {_span(used + pending)} of your {_span(quota)} of GPU time "
            f"for the last 24 hours{need}. It starts by itself when enough frees up (from about {when}, "
            f"in {_span(max(0.0, frees - now))})."))


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.0f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def fit_storage(result: IntakeResult, used_bytes: int, quota_bytes: int, disk_notice: str | None) -> None:
    """Move the accepted images of an upload that do not fit into the refused ones: all of them while the
    disk is low (bot/diskguard.py), else those that would take the owner over their storage quota
    (``limits.max_storage_mib_per_user``; 0: none). In upload order: the first ones that fit are kept."""
    keep = []
    total = used_bytes
    for im in result.accepted:
        if disk_notice:
            result.rejected.append((im.name, "was not stored: the server's disk is nearly full; try again later "
                                             "(the admins have been told)"))
        elif quota_bytes > 0 and total + im.bytes > quota_bytes:
            result.rejected.append((im.name, f"would take you over your storage quota: you use {_mib(total)} of "
                                             f"{_mib(quota_bytes)}; delete a dataset or old jobs (`/job delete`) "
                                             "to make room (see `/me`)"))
        else:
            keep.append(im)
            total += im.bytes
    dropped = {im.sha256 for im in result.accepted} - {im.sha256 for im in keep}
    result.accepted = keep
    masks = []
    for m in result.masks:  # a mask follows its image, and counts against the quota too
        if m.image_sha256 in dropped:
            result.rejected.append((m.name, f"was not stored: its image `{m.image_name}` was not"))
        elif disk_notice:
            result.rejected.append((m.name, "was not stored: the server's disk is nearly full; try again later"))
        elif quota_bytes > 0 and total + m.bytes > quota_bytes:
            result.rejected.append((m.name, f"would take you over your storage quota ({_mib(quota_bytes)}); "
                                            "delete a dataset or old jobs (`/job delete`) to make room"))
        else:
            masks.append(m)
            total += m.bytes
    result.masks = masks


async def storage_refusal(repo: Repo, owner_id: int, config: Config) -> str | None:
    """Why a new job is refused for storage (``limits.max_storage_mib_per_user``): its owner already fills
    their quota, and every job adds results. None when there is room (or no quota)."""
    quota = int(config.limits.max_storage_mib_per_user * 1024 * 1024)
    if quota <= 0:
        return None
    used = (await usage.storage_usage(repo.db, owner_id)).total_bytes
    if used < quota:
        return None
    return (f"You use {_mib(used)} of your {_mib(quota)} of storage (dataset images and job results), so no new "
            "job can start. Delete old jobs (`/job delete`) or datasets (`/dataset delete`) to make room; `/me` "
            "shows what you use.")
