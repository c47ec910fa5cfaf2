"""The fake Discord harness itself, exercised with a small throwaway bot (not the project's bot)."""

from __future__ import annotations

import asyncio
import io

import discord
import pytest
from discord import app_commands
from discord.ext import commands
from fakediscord import FakeDiscord

pytestmark = pytest.mark.timeout(30)


def make_bot(intents: discord.Intents | None = None) -> commands.Bot:
    bot = commands.Bot(
        command_prefix="!", intents=intents or discord.Intents.default(), guild_ready_timeout=0.05
    )
    bot.errors = []  # type: ignore[attr-defined]

    @bot.tree.error
    async def on_app_command_error(
        interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        bot.errors.append(error)  # type: ignore[attr-defined]

    return bot


def add_echo(bot: commands.Bot) -> None:
    @bot.tree.command(name="echo", description="download an attachment and send it back reversed")
    async def echo(interaction: discord.Interaction, image: discord.Attachment, caption: str) -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read()
        await interaction.followup.send(
            f"{caption}: {len(data)} bytes",
            file=discord.File(io.BytesIO(data[::-1]), filename="reversed.bin"),
        )


async def test_direct_path_defer_download_followup(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = make_bot()
    add_echo(bot)
    await bot.login(fake.token)
    try:
        att = fake.add_attachment("in.png", b"\x89PNG-fake-bytes")
        payload = fake.slash_command("echo", {"image": att, "caption": "hi"}, user="bob")
        fake.feed(bot, payload)

        follow = await fake.wait_for_call("POST /webhooks/")
        assert not bot.errors
        # deferral callback came first, as a "thinking" defer (type 5)
        cb = fake.calls("POST", "/callback")[0]
        assert cb.path == f"/interactions/{payload['id']}/{payload['token']}/callback"
        assert cb.query == {"with_response": "1"} and cb.json == {"type": 5}
        assert cb.ts < follow.ts
        # the bot downloaded the slash-command attachment from the fake CDN
        assert fake.calls("GET", "/cdn/attachments/")
        # the followup was multipart with the file bytes
        assert follow.status == 200 and follow.files == [("reversed.bin", b"\x89PNG-fake-bytes"[::-1])]
        assert follow.json["content"] == "hi: 15 bytes"
        assert "Authorization" not in follow.headers  # interaction webhooks do not use the bot token
        rec = fake.interaction(payload)
        assert rec.callback_type == 5 and rec.original is not None and rec.original.flags & 128
        [msg] = rec.followups
        assert msg.channel_id == fake.channel_id
        assert msg.file("reversed.bin") == b"\x89PNG-fake-bytes"[::-1]
        assert [m.id for m in fake.channel_messages()] == [rec.original.id, msg.id]
    finally:
        await bot.close()


async def test_rate_limited_followup_is_retried(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = make_bot()
    add_echo(bot)
    await bot.login(fake.token)
    try:
        fake.rate_limit_next("/webhooks/", retry_after=0.05, method="POST")
        payload = fake.slash_command("echo", {"image": fake.add_attachment("a.txt", b"abc"), "caption": "x"})
        fake.feed(bot, payload)
        await fake.wait_for_call(lambda c: c.path.startswith("/webhooks/") and c.status == 200)
        statuses = [c.status for c in fake.calls("POST", "/webhooks/")]
        assert statuses == [429, 200]
        retried = fake.calls("POST", "/webhooks/")
        assert retried[1].ts - retried[0].ts >= 0.04
        assert retried[1].files == [("reversed.bin", b"cba")]
        assert len(fake.interaction(payload).followups) == 1
        assert not bot.errors
    finally:
        await bot.close()


async def test_expired_token_is_visible_and_bot_token_fallback_works(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = make_bot()
    seen: list[discord.HTTPException] = []

    @bot.tree.command(name="slow", description="outlives its interaction token")
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        fake.expire_interaction_token(interaction.token)  # 15 minutes pass...
        try:
            await interaction.followup.send("done")
        except discord.HTTPException as exc:
            seen.append(exc)
            await interaction.channel.send(f"{interaction.user.mention} done")  # bot token path

    await bot.login(fake.token)
    try:
        payload = fake.slash_command("slow", user="carol")
        fake.feed(bot, payload)
        sent = await fake.wait_for_call(f"POST /channels/{fake.channel_id}/messages")
        [exc] = seen
        assert exc.status == 401 and exc.code == 50027 and "Invalid Webhook Token" in exc.text
        assert sent.headers["Authorization"] == f"Bot {fake.token}"
        assert fake.channel_messages()[-1].content == f"<@{fake.users['carol']['id']}> done"
        # a second callback for the same interaction is refused like Discord does
        assert fake.interaction(payload).responded
    finally:
        await bot.close()


class Panel(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=30)
        self.clicked_by: list[int] = []

    @discord.ui.button(label="Go", custom_id="panel:go", style=discord.ButtonStyle.primary)
    async def go(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicked_by.append(interaction.user.id)
        await interaction.response.edit_message(content="clicked", view=None)


async def test_full_gateway_path_command_and_button(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    intents = discord.Intents.default()
    intents.members = True  # so GUILD_CREATE carries all members (and discord.py chunks: op 8)
    bot = make_bot(intents)
    panels: list[Panel] = []

    @bot.tree.command(name="panel", description="a message with a button")
    async def panel(interaction: discord.Interaction) -> None:
        assert interaction.guild is not None and interaction.guild.name == "loraforge test guild"
        view = Panel()
        panels.append(view)
        await interaction.response.send_message("press it", view=view)

    @bot.tree.command(name="pick", description="autocomplete")
    async def pick(interaction: discord.Interaction, dataset: str) -> None:
        await interaction.response.send_message(dataset, ephemeral=True)

    @pick.autocomplete("dataset")
    async def pick_ac(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = ["chibi", "chihuahua", "landscape"]
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)]

    task = asyncio.create_task(bot.start(fake.token))
    try:
        conn = await fake.wait_for_gateway()
        assert conn.identify["token"] == fake.token and conn.identify["intents"] == intents.value
        await asyncio.wait_for(bot.wait_until_ready(), 5)
        guild = bot.get_guild(fake.guild_id)
        assert guild is not None and guild.get_channel(fake.channel_id).name == "general"
        alice = guild.get_member(int(fake.users["alice"]["id"]))
        assert alice is not None and alice.guild_permissions.administrator
        assert guild.me.id == fake.application_id and bot.user.id == fake.application_id

        synced = await bot.tree.sync()
        assert {c.name for c in synced} == {"panel", "pick"}
        assert fake.command("panel")["description"] == "a message with a button"

        payload = fake.slash_command("panel", user="alice", command_id=fake.command("panel")["id"])
        await fake.dispatch("INTERACTION_CREATE", payload)
        rec = await fake.wait_for_response(payload)
        assert rec.callback_type == 4 and rec.original.custom_ids() == ["panel:go"]

        press = fake.button_press("panel:go", rec.original.id, user="bob")
        await fake.dispatch("INTERACTION_CREATE", press)
        prec = await fake.wait_for_response(press)
        assert prec.callback_type == 7
        msg = fake.message(rec.original.id)
        assert msg.edit_count == 1 and msg.content == "clicked" and msg.components == []
        assert panels[0].clicked_by == [int(fake.users["bob"]["id"])]

        ac = fake.autocomplete("pick", {"dataset": "chi"}, focused="dataset")
        await fake.dispatch("INTERACTION_CREATE", ac)
        acrec = await fake.wait_for_response(ac)
        assert [c["value"] for c in acrec.autocomplete_choices] == ["chibi", "chihuahua"]

        # a dropped connection is resumed and events keep flowing
        await fake.disconnect_all()
        await fake.wait_for(lambda: any(f.get("op") == 6 for c in fake.gateway_conns for f in c.received))
        again = fake.slash_command("panel", user="alice")
        await fake.wait_for_gateway()
        await fake.dispatch("INTERACTION_CREATE", again)
        assert (await fake.wait_for_response(again)).callback_type == 4
        assert not bot.errors
    finally:
        await bot.close()
        await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None


async def test_threads_messages_uploads_dms_with_bot_token(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = make_bot()
    await bot.login(fake.token)
    try:
        channel = await bot.fetch_channel(fake.channel_id)
        assert isinstance(channel, discord.TextChannel)
        thread = await channel.create_thread(name="job-1", type=discord.ChannelType.public_thread)
        assert thread.id in fake.threads and thread.parent_id == fake.channel_id

        msg = await thread.send("queued", file=discord.File(io.BytesIO(b"a=1\n"), filename="spec.toml"))
        for pct in (10, 50, 100):
            msg = await msg.edit(content=f"running {pct}%")
        stored = fake.channel_messages(thread.id)[0]
        assert stored.edit_count == 3 and stored.content == "running 100%"
        assert stored.file_names == ["spec.toml"]  # kept across edits
        assert stored.history[0]["content"] == "queued"
        assert await msg.attachments[0].read() == b"a=1\n"
        assert all(
            c.headers["Authorization"] == f"Bot {fake.token}" for c in fake.calls(path_contains="/channels/")
        )

        fake.set_upload_limit(1024, channel_id=thread.id)
        with pytest.raises(discord.HTTPException) as err:
            await thread.send(file=discord.File(io.BytesIO(b"x" * 2048), filename="big.safetensors"))
        assert err.value.status == 413 and err.value.code == 40005

        bob = await bot.fetch_user(int(fake.users["bob"]["id"]))
        await bob.send("your LoRA is ready")
        assert [m.content for m in fake.dm_messages("bob")] == ["your LoRA is ready"]

        with pytest.raises(discord.NotFound):
            await bot.fetch_channel(1234)
        assert fake.unknown_calls == []
    finally:
        await bot.close()


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"job:cancel:(?P<id>\d+)"):
    cancelled: list[int] = []

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Cancel", custom_id=f"job:cancel:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):  # type: ignore[override]
        return cls(int(match["id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        CancelButton.cancelled.append(self.job_id)
        await interaction.response.send_message(f"job {self.job_id} cancelled", ephemeral=True)


class NameModal(discord.ui.Modal, title="Name it"):
    name = discord.ui.TextInput(label="Name", custom_id="name")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"named {self.name.value}")


async def test_running_helper_threads_dynamic_items_modal(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    bot = make_bot()
    bot.add_dynamic_items(CancelButton)

    @bot.tree.command(name="job", description="start a job in a thread")
    async def job(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        thread = await interaction.channel.create_thread(name="job-7", type=discord.ChannelType.public_thread)
        view = discord.ui.View(timeout=None)
        view.add_item(CancelButton(7))
        await thread.send("job 7 queued", view=view)
        await interaction.edit_original_response(content=f"queued in {thread.mention}")

    @bot.tree.command(name="rename", description="opens a modal")
    async def rename(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(NameModal())

    async with fake.running(bot):
        payload = fake.slash_command("job", user="bob")
        await fake.dispatch("INTERACTION_CREATE", payload)
        edit = await fake.wait_for_call("PATCH /messages/@original")
        rec = fake.interaction(payload)
        assert rec.original.ephemeral and not rec.original.flags & 128  # loading flag cleared by the edit
        [tid] = fake.threads
        assert edit.json["content"] == f"queued in <#{tid}>"
        await fake.wait_for(
            lambda: bot.get_guild(fake.guild_id).get_thread(tid) is not None
        )  # THREAD_CREATE echo
        [queued] = fake.channel_messages(tid)
        assert queued.custom_ids() == ["job:cancel:7"]

        # the persistent (DynamicItem) button still works for a message the bot did not just send
        press = fake.button_press("job:cancel:7", queued.id, user="bob")
        await fake.dispatch("INTERACTION_CREATE", press)
        answer = await fake.wait_for_response(press)
        assert CancelButton.cancelled == [7] and answer.original.content == "job 7 cancelled"
        assert answer.original.channel_id == tid

        payload = fake.slash_command("rename", user="alice")
        await fake.dispatch("INTERACTION_CREATE", payload)
        modal = (await fake.wait_for_response(payload)).modal
        assert modal["title"] == "Name it"
        submit = fake.modal_submit(modal["custom_id"], {"name": "chibi-v2"}, user="alice")
        await fake.dispatch("INTERACTION_CREATE", submit)
        assert (await fake.wait_for_response(submit)).original.content == "named chibi-v2"
        assert not bot.errors
    assert bot.is_closed()
