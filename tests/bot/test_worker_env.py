"""Workers get an allow-listed environment: no bot token, no link secret, nothing named like a credential,
in the worker process itself (/proc/<pid>/environ) or in anything it writes to its log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bot.config import config_from_dict
from bot.service import Service
from bot.worker_env import worker_environment

STUB = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")
SECRETS = {
    "LORAFORGE_TOKEN": "tok-5ecret-aaaa",
    "LORAFORGE_LINK_SECRET": "link-5ecret-bbbb",
    "HF_TOKEN": "hf-5ecret-cccc",
    "DISCORD_LOGIN": "login-5ecret-dddd",  # configured as token_env: denied though nothing in its name says so
    "AWS_SECRET_ACCESS_KEY": "aws-5ecret-eeee",
    "SOME_API_KEY": "api-5ecret-ffff",  # listed in env_pass: still refused
    "DB_PASSWORD": "pw-5ecret-gggg",
    "UNRELATED_SETTING": "not-needed-hhhh",
}


def test_allow_list_unit() -> None:
    src = {**SECRETS, "PATH": "/usr/bin", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/h",
           "LC_ALL": "C.UTF-8", "MY_EXTRA": "x"}
    env = worker_environment(src, extra=["MY_*", "SOME_API_KEY"], deny=["DISCORD_LOGIN"])
    assert env == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/h",
                   "LC_ALL": "C.UTF-8", "MY_EXTRA": "x"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
async def test_real_worker_process_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STUB_DUMP_ENV", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = config_from_dict({
        "paths": {"data_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "models")},
        "discord": {"token_env": "DISCORD_LOGIN"},
        "limits": {"daily_gpu_minutes_per_user": 0},
        "workers": {"devices": ["cpu", "cpu"], "worker_cmd": [sys.executable, STUB], "ready_timeout_s": 30,
                    "env_pass": ["STUB_DUMP_ENV", "SOME_API_KEY"]},
    })
    svc = Service(cfg)
    await svc.start()
    try:
        job = await svc.scheduler.submit(1, "train", {"kind": "train", "output_name": "fast", "steps": 3})
        assert (await svc.scheduler.wait_for_job(job.id, 30)).state == "succeeded"
        assert len(svc.scheduler.workers) == 2
        for w in svc.scheduler.workers:
            assert w.pid is not None
            raw = Path(f"/proc/{w.pid}/environ").read_bytes()
            env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            assert "PATH" in env and env["OMP_NUM_THREADS"] == "1" and env["STUB_DUMP_ENV"] == "1"
            assert str(Path(__file__).resolve().parents[2]) in env["PYTHONPATH"]
            log_text = w.log_path.read_text()
            assert "ENV PATH=" in log_text  # the worker did dump what it got
            for name, value in SECRETS.items():
                assert name not in env, name
                assert value not in raw.decode(), name
                assert value not in log_text, name
    finally:
        await svc.stop()
