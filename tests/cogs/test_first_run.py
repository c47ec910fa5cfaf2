"""First run from an empty Discord application (issue 18): the commands get published without a slash
command (on start when they changed, or ``python -m bot sync``), the invite link is printed, a refused token
is one line and exit 2, a token in the config file is refused, and every log line shows once.

The shell commands run as real subprocesses (``python -m bot ...``) against the fake Discord, which they
reach through ``[discord] api_url``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from cogkit import add_images, answer, make_config, run_command
from configfile import write_toml as write_config

from bot.app import LoraforgeBot
from bot.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
REFUSED = ("Discord refused the token: reset it in the Developer Portal (Bot > Reset Token) and set "
           "LORAFORGE_TOKEN")


def publishes(fake: Any) -> list[Any]:
    return [c for c in fake.calls("PUT", "/commands") if c.status == 200]


def write_toml(path: Path, cfg: Any, **discord: Any) -> Path:
    """The test's Config as a TOML file for a subprocess (values are strings, numbers, bools, lists)."""
    data = json.loads(cfg.model_dump_json())
    data["discord"].update(discord)
    return write_config(path, data)


async def bot_cli(*args: str, token: str, timeout: float = 60.0) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFORGE_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_first_start_publishes_then_train_works_and_a_second_start_does_not(
    fake_discord: Any, bot_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = fake_discord
    assert fake.commands == {}  # an empty application
    bot = bot_factory(discord={"publish_commands_on_start": True})
    async with fake.running(bot, gateway=False):
        await asyncio.wait_for(bot.service_ready.wait(), 60)
        assert len(publishes(fake)) == 1
        assert {"dataset", "train", "job", "admin"} <= {c["name"] for c in fake.commands[None]}
        out = capsys.readouterr().out
        assert "scope=bot+applications.commands" in out and f"client_id={fake.application_id}" in out
        assert "permissions=" in out
        rec = await run_command(fake, bot, "dataset", {"name": "first", **add_images(fake, 2)}, user="bob",
                                subcommand="create", command_id=fake.command("dataset")["id"])
        assert "added" in answer(rec), answer(rec)
        rec = await run_command(fake, bot, "train", {"dataset": "first", "steps": 4}, user="bob",
                                command_id=fake.command("train")["id"])
        assert "Queued job **#1**" in answer(rec), answer(rec)

    again = bot_factory()  # a restart: same data dir, same commands
    async with fake.running(again, gateway=False):
        await asyncio.wait_for(again.service_ready.wait(), 60)
    assert len(publishes(fake)) == 1, "a start with the same commands must not publish again"
    assert "client_id=" not in capsys.readouterr().out  # the invite link is for the first start

    fewer = LoraforgeBot(make_config(bot.config.data_dir.parent, fake, discord={"publish_commands_on_start": True}),
                         cogs=("cogs.datasets", "cogs.train", "cogs.jobs", "cogs.models", "cogs.admin", "cogs.me"))
    async with fake.running(fewer, gateway=False):  # an upgrade that changed the commands: published once
        await asyncio.wait_for(fewer.service_ready.wait(), 60)
    assert len(publishes(fake)) == 2 and "merge" not in {c["name"] for c in fake.commands[None]}


async def test_publish_on_start_can_be_turned_off(fake_discord: Any, bot_factory: Any) -> None:
    bot = bot_factory(discord={"publish_commands_on_start": False})
    async with fake_discord.running(bot, gateway=False):
        await asyncio.wait_for(bot.service_ready.wait(), 60)
    assert publishes(fake_discord) == [] and fake_discord.commands == {}


async def test_sync_from_the_shell_publishes_to_the_guild(fake_discord: Any, tmp_path: Path) -> None:
    fake = fake_discord
    cfg = write_toml(tmp_path / "config.toml", make_config(tmp_path, fake), api_url=fake.api_base)
    rc, out, err = await bot_cli("sync", "--guild", str(fake.guild_id), "--config", str(cfg), token=fake.token)
    assert rc == 0, err
    assert f"to server {fake.guild_id}" in out and "/train" in out, out
    assert "scope=bot+applications.commands" in out
    assert {"dataset", "train", "admin"} <= {c["name"] for c in fake.commands[fake.guild_id]}
    assert None not in fake.commands  # only that guild
    assert "Traceback" not in err


async def test_a_refused_token_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from fakediscord import FakeDiscord

    async with FakeDiscord(strict_token=True) as fake:
        cfg = write_toml(tmp_path / "config.toml", make_config(tmp_path, fake), api_url=fake.api_base)
        for command in ("run", "sync"):
            rc, out, err = await bot_cli(command, "--config", str(cfg), token="not-the-token")
            assert rc == 2, (out, err)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert lines == [REFUSED], err
            assert "Traceback" not in err + out


def test_a_token_in_the_config_file_is_refused(tmp_path: Path) -> None:
    for text in ('[discord]\ntoken = "abc.def"\n', 'token = "abc.def"\n'):
        p = tmp_path / "config.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="use LORAFORGE_TOKEN"):
            load_config(p)


async def test_each_log_line_shows_once_and_no_voice_warning(fake_discord: Any, tmp_path: Path) -> None:
    fake = fake_discord
    cfg = write_toml(tmp_path / "config.toml", make_config(tmp_path, fake), api_url=fake.api_base,
                     publish_commands_on_start=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFORGE_TOKEN": fake.token, "HF_HUB_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", "--config", str(cfg), cwd=ROOT,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    seen = b""
    try:
        assert proc.stderr is not None
        while b"logged in as" not in seen:  # after READY and the GUILD_CREATEs
            seen += await asyncio.wait_for(proc.stderr.readline(), 60)
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = (seen + err).decode()
    lines = [ln.split(" ", 2)[-1] for ln in text.splitlines() if " INFO " in ln or " WARNING " in ln]
    assert sum("logged in as" in ln for ln in lines) == 1, text
    assert sum("published" in ln for ln in lines) == 1, text
    assert all(a != b for a, b in zip(lines, lines[1:], strict=False)), f"log lines printed twice:\n{text}"
    assert "PyNaCl" not in text and "davey" not in text and "voice" not in text.lower()
    assert "client_id=" in out.decode()  # first start: the invite link
