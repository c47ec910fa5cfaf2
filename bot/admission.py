"""Admission: whether a job may enter the queue (the spec is valid and allowed, the user is under the limits).

``validate_spec`` checks what the job asks for (kind, a base model of this server, steps and resolution under
the server's limits); ``check_limits`` what the user already has (jobs waiting, device minutes in the last 24
hours, the job's projected cost, stored bytes). Admins are exempt from both limits; ``QuotaError`` is a message for the user.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel

from bot.config import Config, is_listed_base_model, list_base_models
from bot.humanize import format_duration
from bot.quotas import DAY_S, QuotaGate, storage_refusal
from storage import queries
from storage.repo import Repo
from trainer.spec import SpecError, from_json, parse_job, to_json


class QuotaError(Exception):
    """A submission refused by a limit; ``str()`` is a message to show the user as is."""


def validate_spec(config: Config, kind: str, spec: BaseModel | dict[str, Any] | str, is_admin: bool) -> str:
    """The stored spec JSON. A str is an already-resolved spec (retrain) and is kept byte for byte."""
    if isinstance(spec, str):
        model, spec_json = from_json(spec), spec
    else:
        if isinstance(spec, dict):
            spec = parse_job({**spec, "kind": spec.get("kind", kind)})
        model, spec_json = spec, to_json(spec)
    if getattr(model, "kind", None) != kind:
        raise SpecError([("kind", f"the spec is a {getattr(model, 'kind', '?')!r} job, not {kind!r}")])
    base = getattr(model, "base_model", None)
    if base and not is_admin and not is_listed_base_model(str(base), config.models_dir):
        # A user's option or job file must not make a worker open an arbitrary path on this machine.
        names = [n for n, _ in list_base_models(config.models_dir)]
        raise SpecError([("base_model", f"{str(base)[:80]!r} is not a base model of this server; choose one of "
                                        f"{', '.join(names[:20])} (see /models)")])
    if kind == "train" and not is_admin:
        lim = config.limits
        if model.steps > lim.max_steps:  # type: ignore[attr-defined]
            raise QuotaError(
                f"{model.steps} steps is over this server's limit of {lim.max_steps}; "  # type: ignore[attr-defined]
                "choose fewer steps"
            )
        if model.data.resolution > lim.max_resolution:  # type: ignore[attr-defined]
            raise QuotaError(
                f"resolution {model.data.resolution} is over this server's limit of "  # type: ignore[attr-defined]
                f"{lim.max_resolution}; choose a smaller resolution"
            )
    return spec_json


async def check_limits(repo: Repo, config: Config, quotas: QuotaGate, owner_id: int, kind: str, spec_json: str,
                       now: float) -> None:
    """Raise QuotaError when a (non-admin) user may not queue this job now."""
    lim = config.limits
    if refusal := await storage_refusal(repo, owner_id, config):
        raise QuotaError(refusal)
    queued = await repo.count_jobs(owner_id, ["queued"])
    if queued >= lim.max_queued_per_user:
        raise QuotaError(
            f"You already have {queued} job(s) waiting in the queue; the limit is "
            f"{lim.max_queued_per_user}. A slot frees up as soon as one of them starts "
            "(or cancel one with /cancel)."
        )
    if lim.daily_gpu_minutes_per_user <= 0:
        return
    used = await repo.gpu_seconds_since(owner_id, now - DAY_S)
    if used >= lim.daily_gpu_minutes_per_user * 60:
        oldest = await queries.quota_window_start(repo.db, owner_id, now - DAY_S)
        frees = (oldest or now) + DAY_S
        when = dt.datetime.fromtimestamp(frees, dt.UTC).strftime("%H:%M UTC")
        raise QuotaError(
            f"You have used {used / 60:.0f} of your {lim.daily_gpu_minutes_per_user:.0f} GPU "
            f"minutes for the last 24 hours. Time starts freeing up at {when} "
            f"(in about {format_duration(frees - now)})."
        )
    if refusal := await quotas.too_big(kind, json.loads(spec_json)):
        raise QuotaError(refusal)
