"""/merge: attached LoRAs and/or the user's own trained ones -> one LoRA (SVD) or, for admins, a checkpoint.

Every input is checked here, from its safetensors header only (``bot.lorafile``, torch-free), before
anything is queued: a pickle renamed .safetensors, a truncated upload, a checkpoint sent as a LoRA,
LoRAs for different architectures or with layers that do not fit together get an ephemeral answer
naming the file. The worker checks again with torch (finite values, shapes against the base model).
Accepted uploads are stored content-addressed under ``data_dir/inputs/loras/<sha256>/`` (atomic
writes) so the spec can name them before the job exists, and ``/retrain`` finds the same bytes.

The helpers at the top (own-LoRA autocomplete, attachment intake, base-model choice) are shared
with ``cogs/preview.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.autogrid import caption_prompt, train_prompt
from bot.config import BUILTIN_MODELS
from bot.cooldowns import expensive_cooldown
from bot.errors import InvalidInput, NotFound, PermissionDenied
from bot.interactions import (
    bullet_list,
    clip,
    download_attachments,
    ensure_deferred,
    list_base_models,
    submit_job,
)
from bot.lorafile import (
    ARCH_NAMES,
    LoraCheckError,
    LoraInfo,
    base_model_arch,
    check_same_arch,
    check_shapes_match,
    inspect_bytes,
    inspect_file,
    tag_prompt,
)
from bot.options import Ratio, SampleSteps, bounds
from bot.specs import GridSpec, resolve_job
from cogs.train import base_model_choices
from storage.files import write_bytes_atomic
from storage.names import display_file_name, file_stem

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

MiB = 1024 * 1024
# An SDXL rank-128 LoCon is ~900 MB; more than this in one upload is a checkpoint, not a LoRA.
MAX_LORA_BYTES = 1024 * MiB
MAX_INPUTS = 8
_OWN_RE = re.compile(r"^\s*job:(\d+)(?::(\d+))?")


# ---------------------------------------------------------------------------------- shared helpers


@dataclass
class LoraInput:
    """One LoRA to use: checked header info, where it is (or will be) on disk, and what it came with."""

    info: LoraInfo
    label: str  # how the user knows it: the attachment's name or "job:12 name.safetensors"
    path: Path | None = None  # None for an upload until ``save_uploads``
    data: bytes | None = None
    base_model: str | None = None  # the base it was trained on, when known
    prompt: str = ""  # a good prompt for its grid (trigger word / instance prompt)


def clean_name(text: str, default: str) -> str:
    """A file-name-safe output name (the spec's pattern: letters, digits, ``_.- ``)."""
    return file_stem(text, default)


async def own_lora_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete: the final LoRA of each of the user's succeeded jobs (admins: everyone's), newest first."""
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    uid = interaction.user.id
    admin = bot.access.is_admin(interaction)
    cur = current.lower().strip()
    out: list[app_commands.Choice[str]] = []
    try:
        jobs = await bot.repo.list_jobs(None if admin else uid, ["succeeded"], newest_first=True, limit=100)
        for job in jobs:
            arts = await bot.repo.list_artifacts(job.id, "lora")
            if not arts:
                continue
            art = arts[-1]  # the final save (intermediate ones stay on disk)
            label = f"job:{job.id} {Path(art.path).name}"
            if job.owner_id != uid:
                label += f" (user {job.owner_id})"
            if cur and cur not in label.lower():
                continue
            out.append(app_commands.Choice(name=label[:100], value=f"job:{job.id}:{art.id}"))
            if len(out) == 25:
                break
    except Exception:  # noqa: BLE001 - autocomplete must answer, even with nothing
        return out
    return out


def _job_prompt(spec: dict[str, Any]) -> str:
    """What a job's LoRA responds to: a train job's prompts or trigger word, a merge job's grid prompt."""
    if spec.get("kind") == "merge":
        return str((spec.get("grid") or {}).get("prompt") or "").strip()
    return train_prompt(spec)


async def resolve_own_lora(bot: LoraforgeBot, interaction: discord.Interaction, ref: str) -> LoraInput:
    """``job:<id>[:<artifact id>]`` (what autocomplete fills in) -> that job's LoRA, if the user may see it."""
    m = _OWN_RE.match(ref or "")
    if not m:
        raise InvalidInput(f"`{clip(ref, 80)}` is not one of your LoRAs.",
                           "Pick one from the suggestions (they look like `job:12 name.safetensors`).")
    job = await bot.repo.get_job(int(m.group(1)))
    bot.access.require_job_access(interaction, job)  # others' jobs look like missing ones
    if job.state != "succeeded":
        raise InvalidInput(f"Job #{job.id} has not finished successfully, so it has no LoRA to use.")
    arts = await bot.repo.list_artifacts(job.id, "lora")
    if m.group(2):
        arts = [a for a in arts if a.id == int(m.group(2))]
    if not arts:
        raise NotFound(f"Job #{job.id} has no LoRA file.", "Pick another one from the suggestions.")
    art = arts[-1]
    path = Path(art.path)
    if not path.is_absolute():
        path = bot.files.resolve(art.path)
    label = f"job:{job.id} {path.name}"
    try:
        info = await asyncio.to_thread(inspect_file, path, label)
    except LoraCheckError as e:
        raise InvalidInput(str(e)) from None
    spec = job.spec
    base = spec.get("base_model") if isinstance(spec.get("base_model"), str) else None
    # What the job trained on (never the file name its metadata carries: the LoRA never saw it).
    prompt = _job_prompt(spec) or await asyncio.to_thread(caption_prompt, spec)
    return LoraInput(info, label, path=path, base_model=base, prompt=prompt)


async def fetch_attached_loras(attachments: list[discord.Attachment | None]) -> list[LoraInput]:
    """Download the attachments now (Discord drops them soon) and check each header. Every problem
    of every file is reported at once, so the user fixes them in one go."""
    att = [a for a in attachments if a is not None]
    if not att:
        return []
    problems: list[str] = []
    for a in att:
        if not a.filename.lower().endswith(".safetensors"):
            problems.append(f"`{display_file_name(a.filename)}` is not a .safetensors file; only kohya LoRAs saved as "
                            ".safetensors are accepted (nothing is ever unpickled).")
    if problems:
        raise InvalidInput("Some files cannot be used:\n" + bullet_list(problems), "Attach kohya .safetensors LoRAs.")
    files, refused = await download_attachments(att, max_bytes=MAX_LORA_BYTES)
    problems += [f"`{n}` {why}." for n, why in refused]
    out: list[LoraInput] = []
    for name, data in files:
        try:
            info = await asyncio.to_thread(inspect_bytes, data, name)
        except LoraCheckError as e:
            problems.append(str(e))
            continue
        out.append(LoraInput(info, f"`{name}`", data=data, prompt=tag_prompt(info.metadata)))
    if problems:
        raise InvalidInput(clip("Some files cannot be used:\n" + bullet_list(problems)),
                           "Fix or replace them and run the command again. Nothing was queued.")
    return out


def check_inputs(inputs: list[LoraInput]) -> str | None:
    """All inputs together: one architecture, layers of the same size. Returns the arch (None: unknown)."""
    infos = [i.info for i in inputs]
    try:
        arch = check_same_arch(infos)
        check_shapes_match(infos)
    except LoraCheckError as e:
        raise InvalidInput(str(e), "Nothing was queued.") from None
    return arch


def _match_base(bot: LoraforgeBot, hint: str) -> str | None:
    """A base model of this server that a LoRA's ``ss_sd_model_name`` (a name, file name or path) names."""
    hint = (hint or "").strip()
    if not hint:
        return None
    names = [n for n, _ in list_base_models(bot.config.models_dir)]
    tail = Path(hint.replace("\\", "/")).name
    for n in names:
        if hint == n or tail == Path(n).name or Path(tail).stem == Path(n).stem:
            return n
    return None


async def choose_base_model(
    bot: LoraforgeBot, interaction: discord.Interaction, given: str | None, inputs: list[LoraInput], arch: str | None,
) -> tuple[str | None, str]:
    """(base model or None, a note for the user). The given one must be a listed model (admins may name
    any path the worker can read); otherwise the base the inputs were trained on, when they agree. The
    base's architecture must match the LoRAs' (an SDXL LoRA on an SD1.5 base is refused here)."""
    listed = [n for n, _ in await asyncio.to_thread(list_base_models, bot.config.models_dir)]
    note = ""
    if given:
        given = given.strip()
        if given not in listed and not bot.access.is_admin(interaction):
            raise InvalidInput(f"`{clip(given, 80)}` is not a base model of this server.",
                               "Pick one from the suggestions, or see `/models`.")
        base: str | None = given
    else:
        known = {i.base_model for i in inputs if i.base_model in listed}
        known |= {b for i in inputs if not i.base_model and (b := _match_base(bot, i.info.metadata.get(
            "ss_sd_model_name", "")))}
        base = known.pop() if len(known) == 1 else None
        if base:
            note = f"Base model `{base}` (the one the LoRA was trained on)."
    if base:
        base_arch = await asyncio.to_thread(base_model_arch, base, bot.config.models_dir)
        try:
            check_same_arch([i.info for i in inputs], base_arch, base)
        except LoraCheckError as e:
            raise InvalidInput(str(e), "Nothing was queued.") from None
    elif arch:
        # Not known (a file from another trainer, or inputs made on different bases): the check grid uses
        # this server's own base of that architecture. The built-in tiny models are for tests and demos.
        candidates = [n for n in listed if n not in BUILTIN_MODELS
                      and await asyncio.to_thread(base_model_arch, n, bot.config.models_dir) == arch]
        if candidates:
            base = candidates[0]
            which = "only" if len(candidates) == 1 else "first"
            note = (f"Base model `{base}` for the check grid, this server's {which} {ARCH_NAMES[arch]} base "
                    "(the LoRAs do not say which base they were trained on); pick another with `base_model`.")
        else:
            note = f"The inputs are {ARCH_NAMES[arch]} LoRAs."
    return base, note


def _store(root: Path, item: LoraInput) -> Path:
    assert item.data is not None
    digest = hashlib.sha256(item.data).hexdigest()
    name = clean_name(Path(item.info.name).stem, "lora") + ".safetensors"
    path = root / "inputs" / "loras" / digest / name
    if not (path.is_file() and path.stat().st_size == len(item.data)):
        write_bytes_atomic(path, item.data)  # temp file + rename: never half a file under this name
    return path.resolve()


async def save_uploads(bot: LoraforgeBot, inputs: list[LoraInput]) -> None:
    """Write accepted uploads under the data dir (content-addressed, atomic) and drop the bytes."""
    for item in inputs:
        if item.path is None and item.data is not None:
            item.path = await asyncio.to_thread(_store, bot.files.root, item)
            item.data = None


def parse_float_list(text: str | None, field: str, lo: float, hi: float, *, max_n: int) -> list[float]:
    """``"0.6, 0.6,0.6"`` -> [0.6, 0.6, 0.6]; each value checked against [lo, hi]."""
    parts = [p for p in re.split(r"[,\s;]+", (text or "").strip()) if p]
    if not parts:
        raise InvalidInput(f"`{field}` is empty.", "Give numbers separated by commas, e.g. `0.6,0.6`.")
    if len(parts) > max_n:
        raise InvalidInput(f"`{field}` has {len(parts)} values; at most {max_n} are allowed.")
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise InvalidInput(f"`{field}`: `{clip(p, 30)}` is not a number.",
                               "Give numbers separated by commas, e.g. `0.6,0.6`.") from None
        if not (lo <= v <= hi):
            raise InvalidInput(f"`{field}` takes numbers from {lo:g} to {hi:g}; {v:g} is not.")
        out.append(v)
    return out


def parse_int_list(text: str | None, field: str, lo: float, hi: float, *, max_n: int) -> list[int]:
    vals = parse_float_list(text, field, lo, hi, max_n=max_n)
    if any(v != int(v) for v in vals):
        raise InvalidInput(f"`{field}` takes whole numbers, e.g. `1111,2222,3333`.")
    return [int(v) for v in vals]


def parse_rank(text: str | None, field: str) -> int | str:
    t = (text or "auto").strip().lower()
    if t == "auto":
        return "auto"
    if not t.isdigit() or not 1 <= int(t) <= 1024:
        raise InvalidInput(f"`{field}` must be a whole number from 1 to 1024, or `auto` (the largest input rank).")
    return int(t)


# The merge job's `clamp` (trainer.spec.MergeSpec) by the names a user knows: kohya's clamp is `clamp = true`.
CLAMPS: dict[str, bool | str] = {"auto": "auto", "kohya": True, "off": False}
CLAMP_CHOICES = [app_commands.Choice(name=n, value=n) for n in CLAMPS]


def parse_clamp(text: str | None) -> bool | str:
    t = (text or "auto").strip().lower()
    if t not in CLAMPS:  # a raw interaction can send anything
        raise InvalidInput(f"`clamp` must be one of {', '.join(CLAMPS)} (got `{clip(t, 20)}`).")
    return CLAMPS[t]


# ---------------------------------------------------------------------------------- the command


class Merge(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(name="merge", description="Merge LoRAs into one (SVD), with a strength x seed check grid")
    @app_commands.describe(
        lora1="A kohya LoRA (.safetensors)",
        lora2="Another LoRA", lora3="Another LoRA", lora4="Another LoRA", lora5="Another LoRA",
        mine1="One of your trained LoRAs (after the attached ones)",
        mine2="Another of your LoRAs", mine3="Another of your LoRAs",
        ratios="One ratio for all, or one per LoRA in order (lora1..5, then mine1..3), e.g. 0.6,0.6,0.6",
        rank="Rank of the result, or auto (the largest input rank)",
        conv_rank="Rank of the conv (LoCon) layers, or auto",
        base_model="Base model for the check grid (default: the one the LoRAs were trained on)",
        prompt="Prompt of the check grid (default: the LoRA's trigger word)",
        grid_steps="Sampling steps of the check grid (default 20)",
        output_name="File name of the result",
        into_checkpoint="Admins: merge into the base model and get a checkpoint (by link)",
        half="Save in fp16 (half the size)",
        clamp="auto: exact, clamped only where fp16 would overflow; kohya: svd_merge_lora's 0.99-quantile clamp",
    )
    @app_commands.choices(clamp=CLAMP_CHOICES)
    @app_commands.autocomplete(mine1=own_lora_choices, mine2=own_lora_choices, mine3=own_lora_choices,
                               base_model=base_model_choices)
    @expensive_cooldown
    async def merge(
        self,
        interaction: discord.Interaction,
        lora1: discord.Attachment | None = None,
        lora2: discord.Attachment | None = None,
        lora3: discord.Attachment | None = None,
        lora4: discord.Attachment | None = None,
        lora5: discord.Attachment | None = None,
        mine1: str | None = None,
        mine2: str | None = None,
        mine3: str | None = None,
        ratios: str | None = None,
        rank: str | None = None,
        conv_rank: str | None = None,
        base_model: str | None = None,
        prompt: str | None = None,
        grid_steps: SampleSteps | None = None,
        output_name: str | None = None,
        into_checkpoint: bool = False,
        half: bool = False,
        clamp: str | None = None,
    ) -> None:
        bot = self.bot
        bot.access.require_trainer(interaction)
        if into_checkpoint and not bot.access.is_admin(interaction):
            # A checkpoint is gigabytes of disk and bandwidth per merge.
            raise PermissionDenied("Only admins can merge into a checkpoint (the result is several GB).",
                                   "Leave `into_checkpoint` off to get a merged LoRA instead.")
        await ensure_deferred(interaction, ephemeral=True)
        inputs = await fetch_attached_loras([lora1, lora2, lora3, lora4, lora5])
        for ref in (mine1, mine2, mine3):
            if ref:
                inputs.append(await resolve_own_lora(bot, interaction, ref))
        if not inputs:
            raise InvalidInput("Nothing to merge.", "Attach LoRA files (lora1..lora5) or pick yours (mine1..mine3).")
        if len(inputs) > MAX_INPUTS:
            raise InvalidInput(f"{len(inputs)} LoRAs is too many; at most {MAX_INPUTS} can be merged at once.")
        arch = check_inputs(inputs)
        dora = [i.label for i in inputs if "dora" in i.info.algos]
        if dora and not into_checkpoint:
            raise InvalidInput(f"{', '.join(dora)} is a DoRA network: its change depends on "
                               "the base model's weights, so it cannot be merged into a LoRA.",
                               "Merge it into a checkpoint (admins: `into_checkpoint`), or use it in /preview.")
        values = parse_float_list(ratios or "1", "ratios", *bounds(Ratio), max_n=MAX_INPUTS)
        if len(values) == 1:
            values = values * len(inputs)
        if len(values) != len(inputs):
            raise InvalidInput(f"`ratios` has {len(values)} values for {len(inputs)} LoRAs.",
                               "Give one value for all, or one per LoRA (attached ones first, then yours).")
        base, note = await choose_base_model(bot, interaction, base_model, inputs, arch)
        if into_checkpoint and not base:
            raise InvalidInput("Merging into a checkpoint needs `base_model` (the checkpoint to merge into).")
        grid: GridSpec | None = None
        notes = [note] if note else []
        if not into_checkpoint:
            if base:
                gp = (prompt or "").strip() or next((i.prompt for i in inputs if i.prompt), "")
                grid_values: dict[str, Any] = {"prompt": gp}
                if grid_steps:
                    grid_values["steps"] = int(grid_steps)
                grid = GridSpec(**grid_values)
                notes.append(f"Check grid: strengths {', '.join(f'{s:g}' for s in grid.strengths)} x seeds "
                             f"{', '.join(str(s) for s in grid.seeds)}, prompt *{clip(gp, 80) or '(empty)'}*.")
            else:
                notes.append("No check grid: the base model of these LoRAs is unknown; give `base_model` to get one.")
        default_name = clean_name(Path(inputs[0].info.name).stem, "merged") + "-merged"
        name = clean_name(output_name, default_name) if output_name else default_name[:100]
        values_for_spec = {
            "kind": "merge",
            "rank": parse_rank(rank, "rank"),
            "conv_rank": parse_rank(conv_rank, "conv_rank"),
            "base_model": base,
            "into_checkpoint": into_checkpoint,
            "half": half,
            "clamp": parse_clamp(clamp),
            "output_name": name,
            "grid": grid.model_dump() if grid is not None else None,
        }

        def build() -> Any:
            paths = [str(i.path or i.info.name) for i in inputs]
            return resolve_job({**values_for_spec, "inputs": [
                {"path": p, "ratio": r} for p, r in zip(paths, values, strict=True)]})

        build()  # every setting checked (SpecError) before an upload is written to disk
        await save_uploads(bot, inputs)
        spec = build()
        listing = ", ".join(f"{i.label} x{r:g}" for i, r in zip(inputs, values, strict=True))
        what = "checkpoint" if into_checkpoint else f"rank {spec.rank}"  # type: ignore[union-attr]
        if spec.clamp is True:  # type: ignore[union-attr]
            what += ", kohya's 0.99-quantile clamp"
        summary = clip(f"Merging {listing} -> `{name}.safetensors` ({what}).\n" + "\n".join(notes), 1200)
        # A checkpoint is gigabytes: delivered by signed link, never attached (read by bot.progress).
        await submit_job(interaction, kind="merge", spec=spec, title=f"merge: {name}", summary=summary,
                         meta={"link_only": True} if into_checkpoint else None)


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Merge(bot))
