"""Helpers for the cog tests: config for the real LoraforgeBot against the fake Discord with a stub
worker (or the real engine for the end-to-end test), command runners, test images."""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from bot.config import config_from_dict

STUB = str(Path(__file__).with_name("worker_stub.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(color: tuple[int, int, int], size: int = 72) -> bytes:
    im = Image.new("RGB", (size, size), color)
    for x in range(size // 4, size // 2):
        for y in range(size // 4, size // 2):
            im.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_config(tmp: Path, fake: Any, *, real_worker: bool = False, **sections: Any) -> Any:
    port = free_port()
    discord_cfg = {
        "admin_role_ids": [fake.role_ids["admin"]],
        "trainer_role_ids": [fake.role_ids["trainer"]],
        "progress_interval_s": 1.0,
        "http_host": "127.0.0.1",
        "http_port": port,
        "public_base_url": f"http://127.0.0.1:{port}",
        # tests/cogs/test_first_run.py covers publishing on start; the others start without it
        "publish_commands_on_start": False,
        **sections.pop("discord", {}),
    }
    workers = {"devices": ["cpu"], "restart_backoff_s": 0.05, "ready_timeout_s": 120,
               "worker_cmd": [] if real_worker else [sys.executable, STUB],
               "env_pass": ["STUB_STEP_S", "FAKE_WORKER_LOG"], **sections.pop("workers", {})}
    # no cooldown unless a test asks for one (tests/cogs/test_security.py): the others run commands back to back
    limits = {"max_queued_per_user": 20, "daily_gpu_minutes_per_user": 0, "stall_timeout_s": 300,
              "cancel_grace_s": 20, "cooldown_s": 0, **sections.pop("limits", {})}
    return config_from_dict({
        "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
        "discord": discord_cfg, "workers": workers, "limits": limits, **sections,
    })


async def run_command(fake: Any, bot: Any, name: str, options: dict | None = None, *, timeout: float = 15.0,
                      **kw: Any) -> Any:
    """Feed a slash command and wait for its final answer (the first followup, or an immediate
    message). Returns the InteractionRecord."""
    payload = fake.slash_command(name, options, **kw)
    rec = fake.feed(bot, payload)
    await fake.wait_for(lambda: rec.callback_type == 4 or bool(rec.followups), timeout)
    return rec


def answer(rec: Any) -> str:
    if rec.followups:
        return rec.followups[-1].content
    return rec.original.content if rec.original is not None else ""


def add_images(fake: Any, n: int = 3) -> dict[str, Any]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    opts: dict[str, Any] = {}
    for i in range(n):
        opts[f"file{i + 1}"] = fake.add_attachment(f"img{i}.png", png_bytes(colors[i % len(colors)]))
    return opts
