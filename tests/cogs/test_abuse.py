"""Abuse (issue 17): 20 users send 10 commands each with hostile values, all at once per wave, through the
fake Discord. Afterwards: no file was written outside the data folder, no secret is in any worker's environment
or log, every quota held, and a normal user was answered within 3 s throughout."""

from __future__ import annotations

import io
import os
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cogkit import answer, make_config, png_bytes

from bot.app import LoraforgeBot
from storage import usage

RLO = "\u202e"
SECRETS = {"LORAFORGE_TOKEN": "tok-ABUSE-5ecret-1234", "LORAFORGE_LINK_SECRET": "link-ABUSE-5ecret-5678",
           "HF_TOKEN": "hf-ABUSE-5ecret-9012"}
USERS = 20
LIMITS = {"max_queued_per_user": 2, "max_running_per_user": 1, "daily_gpu_minutes_per_user": 1.0,
          "max_steps": 500, "max_resolution": 512, "max_storage_mib_per_user": 0.2, "cooldown_s": 60,
          "cooldown_uses": 2, "max_parallel_downloads": 4}


def files_outside(root: Path, data: Path) -> dict[str, int]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_relative_to(data):
            out[str(p)] = p.stat().st_size
    return out


def hostile_zip(i: int, pwn: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"../../escape{i}.png", png_bytes((i, 1, 1)))
        z.writestr(str(pwn / f"abs{i}.png"), png_bytes((i, 2, 2)))
        z.writestr(f"..\\..\\win{i}.png", png_bytes((i, 3, 3)))
        z.writestr(f"ok/{RLO}{'x' * 150}.png", png_bytes((i, 4, 4)))
        z.writestr(f"ok/{RLO}{'x' * 150}.txt", f"caption \x1b[31m{RLO} with controls")
    return buf.getvalue()


def commands_for(fake: Any, i: int, user: str, pwn: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    ds = f"ds{i}"
    att = fake.add_attachment
    return [
        ("dataset", "create", {"name": f"../../evil{i}", "file1": att(f"../../{i}.png", png_bytes((i, 9, 9)))}),
        ("dataset", "create", {"name": ds, "trigger_word": f"{RLO}trg\x00{i}", "class_prompt": "x" * 3000,
                               "file1": att(f"{RLO}{'gnp.' * 50}{i}.png", png_bytes((i, 8, 8))),
                               "file2": att(f"z{i}.zip", hostile_zip(i, pwn)),
                               "file3": att(f"a\x00b{i}.png", png_bytes((i, 7, 7)))}),
        ("dataset", "add", {"dataset": ds, "file1": att(f"..\\..\\{i}.png", png_bytes((i, 6, 6))),
                            "file2": att("big.png", os.urandom(300_000))}),
        ("train", None, {"dataset": ds, "output_name": f"../../../pwn{i}", "steps": 3}),
        ("train", None, {"dataset": ds, "preset": "../../../../etc/passwd", "steps": 3}),
        ("train", None, {"dataset": ds, "base_model": str(pwn / "model.safetensors"), "steps": 3}),
        ("train", None, {"dataset": ds, "steps": 200_000, "resolution": 4096}),
        ("train", None, {"dataset": ds, "steps": 3, "output_name": f"fast{i}"}),
        ("preview", None, {"prompt": f"{RLO}" + "p" * 2000, "lora": att(f"..{RLO}x{i}.safetensors", b"\x00" * 64)}),
        ("merge", None, {"mine1": "job:1", "mine2": f"job:{i + 1}:999", "ratios": "1e308,nan",
                         "output_name": f"../../merged{i}", "lora1": att(f"{RLO}evil..{i}.safetensors", b"{}" * 8)}),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
async def test_twenty_hostile_users(tmp_path: Path, fake_discord: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_discord
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STUB_DUMP_ENV", "1")
    pwn = Path("/tmp") / f"loraforge-pwn-{uuid.uuid4().hex}"
    cfg = make_config(tmp_path, fake, limits=LIMITS,
                      workers={"devices": ["cpu", "cpu"], "env_pass": ["STUB_DUMP_ENV"]})
    bot = LoraforgeBot(cfg)
    data = Path(cfg.data_dir)
    users = [fake.add_user(f"user{i}", roles=[fake.role_ids["trainer"]]) for i in range(USERS)]
    before = files_outside(tmp_path, data)
    slowest = 0.0
    t_start = time.monotonic()
    async with fake.running(bot, gateway=False):
        await fake.wait_for(lambda: bot.service_ready.is_set(), 60)
        lists = [commands_for(fake, i, f"user{i}", pwn) for i in range(USERS)]
        for wave in range(10):
            recs = []
            for i, u in enumerate(users):
                name, sub, opts = lists[i][wave]
                recs.append(fake.feed(bot, fake.slash_command(name, opts, user=u, **({"subcommand": sub} if sub else {}))))
            # a normal user asks something in the middle of the flood
            t0 = time.monotonic()
            probe = fake.slash_command("me", None, user="bob")
            fake.feed(bot, probe)
            await fake.wait_for_response(probe, timeout=3.0)
            slowest = max(slowest, time.monotonic() - t0)
            await fake.wait_for(lambda recs=recs: all(r.callback_type == 4 or r.followups for r in recs), 30)
            answers = [answer(r) for r in recs]
            assert all(a for a in answers), (wave, answers)
            assert not any(RLO in a or "\x1b" in a or "\x00" in a for a in answers), wave
        for j in await bot.repo.list_jobs(states=["queued", "running"]):
            await bot.scheduler.wait_for_job(j.id, 30)
        # quotas held: only the one valid /train per user ran, within every limit; storage within its quota
        db = bot.repo
        for i, u in enumerate(users):
            uid = int(u["id"])
            jobs = await db.list_jobs(uid)
            assert len(jobs) == 1, (i, [j.spec_json[:80] for j in jobs])  # the one valid /train, nothing else
            for j in jobs:
                assert j.spec["steps"] <= LIMITS["max_steps"] and j.spec["data"]["resolution"] <= LIMITS["max_resolution"]
                assert j.spec["output_name"] == f"fast{i}"
            st = await usage.storage_usage(db.db, uid)
            assert st.total_bytes <= LIMITS["max_storage_mib_per_user"] * 1024 * 1024
            for d in await db.list_datasets(owner_id=uid):
                assert d.name == f"ds{i}" and RLO not in d.trigger_word and len(d.class_prompt) <= 200
                for im in await db.list_images(d.id):
                    assert RLO not in im.original_name and len(im.original_name) <= 100
                    assert im.caption is None or RLO not in im.caption
        workers = bot.scheduler.workers
        environs = [Path(f"/proc/{w.pid}/environ").read_bytes().decode() for w in workers if w.pid]
        assert len(environs) == 2
    elapsed = time.monotonic() - t_start

    # nothing outside the data folder; nothing links out of it
    assert files_outside(tmp_path, data) == before
    assert not pwn.exists()
    assert not any(p.is_symlink() for p in data.rglob("*"))
    assert not any(list(tmp_path.rglob(g)) for g in ("escape*", "pwn*", "merged*", "evil*"))
    # no secret in a worker's environment or log (the stub dumped its whole environment there)
    logs = [p.read_text(errors="replace") for p in (data / "logs").glob("*.log")]
    assert logs and all("ENV PATH=" in t for t in logs)
    for value in SECRETS.values():
        assert not any(value in e for e in environs) and not any(value in t for t in logs)
    assert slowest < 3.0
    print(f"abuse test: {USERS} users x 10 commands in {elapsed:.1f} s; slowest probe {slowest:.2f} s")
