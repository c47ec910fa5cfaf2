"""/dataset create|add|list|show|caption|delete.

Attachments are downloaded inside the handler (Discord drops slash-command attachments soon after),
then go through the service's intake (images, .txt captions, .zip archives). Replies are ephemeral:
datasets are private unless shared, and nobody else needs to see upload reports.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.cooldowns import expensive_cooldown
from bot.errors import InvalidInput, NotFound, reply
from bot.interactions import bullet_list, clip, download_attachments, ensure_deferred
from bot.options import ImageNumber, Page
from storage.names import display_text

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

MiB = 1024 * 1024
SHEET_MAX_IMAGES = 60
NAME_RE = re.compile(r"^[\w][\w .\-]{0,62}$")
_ID_RE = re.compile(r"^#(\d+)$")


async def resolve_dataset(bot: LoraforgeBot, interaction: discord.Interaction, ref: str) -> Any:
    """A dataset the user may read, from what autocomplete filled in (``#<id>``) or a typed name
    (own first, then shared ones). Not-found and not-allowed look the same."""
    ref = (ref or "").strip()
    repo = bot.repo
    m = _ID_RE.match(ref)
    ds = None
    if m:
        ds = await repo.get_dataset(int(m.group(1)))
    else:
        ds = await repo.find_dataset_by_name(interaction.user.id, ref)
        if ds is None:
            matches = [d for d in await repo.list_datasets(visible_to=interaction.user.id)
                       if d.name.lower() == ref.lower()]
            if len(matches) > 1:
                raise InvalidInput(f"Several shared datasets are named {ref!r}.", "Pick one from the suggestions.")
            ds = matches[0] if matches else None
    bot.access.require_dataset_read(interaction, ds)
    return ds


async def dataset_choices(
    interaction: discord.Interaction, current: str, *, own_only: bool = False
) -> list[app_commands.Choice[str]]:
    """Autocomplete: the user's datasets, then shared ones (max 25, Discord's limit)."""
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    uid = interaction.user.id
    try:
        items = await bot.repo.list_datasets(owner_id=uid) if own_only else await bot.repo.list_datasets(visible_to=uid)
    except Exception:  # noqa: BLE001 - autocomplete must answer, even with nothing
        return []
    cur = current.lower().strip()
    items.sort(key=lambda d: (d.owner_id != uid, d.name.lower()))
    out = []
    for d in items:
        if cur and cur not in d.name.lower():
            continue
        label = d.name if d.owner_id == uid else f"{d.name} (shared)"
        out.append(app_commands.Choice(name=label[:100], value=f"#{d.id}"))
        if len(out) == 25:
            break
    return out


async def _own_dataset_ac(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return await dataset_choices(interaction, current, own_only=True)


async def _visible_dataset_ac(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return await dataset_choices(interaction, current)


def _upload_report(upload: Any, refused: list[tuple[str, str]], total: int) -> str:
    lines = [f"Dataset **{upload.dataset.name}**: added {len(upload.accepted)} image(s); it now has {total}."]
    if upload.duplicates:
        lines.append(f"Skipped {len(upload.duplicates)} duplicate(s): " + ", ".join(upload.duplicates[:10]))
    rejected = list(refused) + list(upload.rejected)
    if rejected:
        lines.append(f"Refused {len(rejected)} file(s):")
        lines.append(bullet_list([f"`{n}`: {r}" for n, r in rejected]))
    captioned = sum(1 for im in upload.accepted if getattr(im, "caption", None))
    if upload.accepted:
        lines.append(f"{captioned} of the new images came with a caption (.txt beside the image).")
    masks = upload.intake.masks if upload.intake is not None else []
    if masks:
        lines.append(f"{len(masks)} mask(s) paired with their images: training on this dataset weights each masked "
                     "image's loss by its mask (white: learn, black: ignore; images without a mask count everywhere)")
    return clip("\n".join(lines))


MAX_FILES = 10  # attachment options per command (file1 required, the rest optional)


def with_file_options(func: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Give a command ``file1``..``file10`` attachment options (file1 required) in place of its
    ``files`` parameter, and call it with ``files=[file1, ..., file10]`` (unset ones None).

    Discord options come from the callback's signature, so the wrapper carries a rewritten
    ``__signature__``: the command's own parameters before ``files``, the ten attachments, then the rest."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("files")
    kw = inspect.Parameter.POSITIONAL_OR_KEYWORD
    attachments = [inspect.Parameter("file1", kw, annotation="discord.Attachment")]
    attachments += [inspect.Parameter(f"file{i}", kw, default=None, annotation="discord.Attachment | None")
                    for i in range(2, MAX_FILES + 1)]

    @functools.wraps(func)
    async def wrapper(self: Any, interaction: discord.Interaction, *args: Any, **kwargs: Any) -> None:
        files = [kwargs.pop(f"file{i}", None) for i in range(1, MAX_FILES + 1)]
        await func(self, interaction, *args, files=files, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params[:at] + attachments + params[at + 1:])  # type: ignore[attr-defined]
    return wrapper


class Datasets(commands.GroupCog, group_name="dataset", group_description="Your training images"):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot
        super().__init__()

    def _max_bytes(self) -> int:
        lim = self.bot.config.limits
        return int(max(lim.max_image_mib, lim.zip_max_mib) * MiB)

    async def _download(
        self, files: list[discord.Attachment | None]
    ) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
        return await download_attachments(files, max_bytes=self._max_bytes(),
                                          max_total=int(self.bot.config.limits.zip_max_total_mib * MiB))

    @app_commands.command(name="create", description="Create a dataset from images, .txt captions or .zip archives")
    @app_commands.describe(
        name="A name for the dataset (yours only)",
        file1="An image, a .txt caption or <image>-masklabel.png mask (same name as its image), or a .zip",
        trigger_word="A rare word the LoRA learns (put first in every caption)",
        class_prompt="What the subject is, e.g. 'woman' or 'dog'",
        shared="Let everyone here train on it (default: private)",
    )
    @with_file_options
    @expensive_cooldown
    async def create(
        self,
        interaction: discord.Interaction,
        name: str,
        files: list[discord.Attachment | None],
        trigger_word: str = "",
        class_prompt: str = "",
        shared: bool = False,
    ) -> None:
        self.bot.access.require_trainer(interaction)
        name = name.strip()
        if not NAME_RE.match(name):
            raise InvalidInput(
                f"{name!r} is not a usable dataset name.",
                "Use up to 63 letters, digits, spaces, dots, dashes or underscores, starting with a letter or digit.",
            )
        await ensure_deferred(interaction, ephemeral=True)
        got, refused = await self._download(files)
        svc = self.bot.service
        upload = await svc.create_dataset_from_files(interaction.user.id, name, got, trigger_word.strip(),
                                                     class_prompt.strip())
        if shared:
            await self.bot.repo.update_dataset(upload.dataset.id, visibility="shared")
        total = await self.bot.repo.count_images(upload.dataset.id)
        text = _upload_report(upload, refused, total)
        text += "\n" + ("Shared: everyone here can train on it." if shared else "Private: only you (and admins) see it.")
        if total == 0:
            text += "\nNo image was accepted: add some with `/dataset add` before training."
        await reply(interaction, clip(text), ephemeral=True)

    @app_commands.command(name="add", description="Add images, captions or .zip archives to one of your datasets")
    @app_commands.autocomplete(dataset=_own_dataset_ac)
    @app_commands.describe(dataset="One of your datasets",
                           file1="An image, a .txt caption or <image>-masklabel.png mask (same name as its image), or a .zip")
    @with_file_options
    async def add(
        self,
        interaction: discord.Interaction,
        dataset: str,
        files: list[discord.Attachment | None],
    ) -> None:
        self.bot.access.require_trainer(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        ds = await resolve_dataset(self.bot, interaction, dataset)
        self.bot.access.require_dataset_write(interaction, ds)
        got, refused = await self._download(files)
        upload = await self.bot.service.add_files(ds.id, got)
        total = await self.bot.repo.count_images(ds.id)
        await reply(interaction, _upload_report(upload, refused, total), ephemeral=True)

    @app_commands.command(name="list", description="Your datasets and the ones shared with you")
    async def list_(self, interaction: discord.Interaction) -> None:
        await ensure_deferred(interaction, ephemeral=True)
        uid = interaction.user.id
        items = await self.bot.repo.list_datasets(visible_to=uid)
        if not items:
            await reply(interaction, "You have no datasets yet. Make one with `/dataset create`.", ephemeral=True)
            return
        lines = []
        for d in items[:40]:
            n = await self.bot.repo.count_images(d.id)
            who = "yours" if d.owner_id == uid else f"shared by <@{d.owner_id}>"
            vis = ", shared" if d.visibility == "shared" and d.owner_id == uid else ""
            trig = f", trigger `{d.trigger_word}`" if d.trigger_word else ""
            lines.append(f"**{d.name}** (#{d.id}): {n} image(s), {who}{vis}{trig}")
        if len(items) > 40:
            lines.append(f"... and {len(items) - 40} more")
        await reply(interaction, clip("\n".join(lines)), ephemeral=True)

    @app_commands.command(name="show", description="A contact sheet of a dataset's images with their captions")
    @app_commands.autocomplete(dataset=_visible_dataset_ac)
    async def show(self, interaction: discord.Interaction, dataset: str, page: Page = 1) -> None:
        await ensure_deferred(interaction, ephemeral=True)
        ds = await resolve_dataset(self.bot, interaction, dataset)
        total = await self.bot.repo.count_images(ds.id)
        images = await self.bot.repo.list_images(ds.id, limit=SHEET_MAX_IMAGES, offset=(page - 1) * SHEET_MAX_IMAGES)
        if not images:
            raise NotFound(f"Dataset **{ds.name}** has no images" + (" on that page." if page > 1 else "."),
                           "Add some with `/dataset add`.")
        files = self.bot.files

        def build() -> bytes:
            from storage.intake import contact_sheet

            pairs = []
            for im in images:
                try:
                    data = files.image_path(ds.id, im.sha256, im.ext).read_bytes()
                except OSError:
                    data = b""
                pairs.append((data, im.caption))
            return contact_sheet(pairs)

        png = await asyncio.to_thread(build)
        first = (page - 1) * SHEET_MAX_IMAGES + 1
        text = (f"**{ds.name}**: images {first}-{first + len(images) - 1} of {total}"
                f"{' · trigger `' + ds.trigger_word + '`' if ds.trigger_word else ''}. "
                "Numbers count left to right, top to bottom (for `/dataset caption`).")
        import io

        await reply(interaction, text, ephemeral=True,
                    files=[discord.File(io.BytesIO(png), filename=f"dataset-{ds.id}-p{page}.png")])

    @app_commands.command(name="caption", description="Set (or clear) the caption of one image")
    @app_commands.autocomplete(dataset=_own_dataset_ac)
    @app_commands.describe(number="The image's number on the /dataset show sheet", caption="New caption; empty clears it")
    async def caption(
        self, interaction: discord.Interaction, dataset: str, number: ImageNumber,
        caption: str = "",
    ) -> None:
        await ensure_deferred(interaction, ephemeral=True)
        ds = await resolve_dataset(self.bot, interaction, dataset)
        self.bot.access.require_dataset_write(interaction, ds)
        rows = await self.bot.repo.list_images(ds.id, limit=1, offset=number - 1)
        if not rows:
            total = await self.bot.repo.count_images(ds.id)
            raise InvalidInput(f"Dataset **{ds.name}** has {total} image(s); there is no number {number}.")
        text = display_text(caption, max_len=2000) or None  # no control/bidi characters in training text
        await self.bot.repo.set_caption(rows[0].id, text)
        await reply(interaction, f"Image {number} of **{ds.name}** ({rows[0].original_name}): "
                    + (f"caption set to: {clip(text, 500)}" if text else "caption cleared."), ephemeral=True)

    @app_commands.command(name="delete", description="Delete one of your datasets and its images")
    @app_commands.autocomplete(dataset=_own_dataset_ac)
    @app_commands.describe(confirm="Set to True: the images cannot be recovered")
    async def delete(self, interaction: discord.Interaction, dataset: str, confirm: bool = False) -> None:
        await ensure_deferred(interaction, ephemeral=True)
        ds = await resolve_dataset(self.bot, interaction, dataset)
        self.bot.access.require_dataset_write(interaction, ds)
        if not confirm:
            n = await self.bot.repo.count_images(ds.id)
            await reply(interaction, f"This deletes **{ds.name}** and its {n} image(s) for good. "
                        "Run the command again with `confirm: True` to do it.", ephemeral=True)
            return
        busy = await self.bot.service.jobs_using_dataset(ds.id)
        if busy:
            ids = ", ".join(f"#{j.id}" for j in busy[:10])
            raise InvalidInput(f"**{ds.name}** is in use by queued or running job(s) {ids}.",
                               "Wait until they finish, or cancel them with `/cancel`, then delete it.")
        await self.bot.service.delete_dataset(ds.id)
        await reply(interaction, f"Deleted dataset **{ds.name}**. Jobs already trained on it keep their results.",
                    ephemeral=True)


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Datasets(bot))
