"""A bot whose event loop ends while a worker still runs (a failed start, a crash in close) must neither hang
the loop's shutdown nor leave the worker process behind."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from bot.workers import WorkerHandle

STUB = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")


def test_loop_shutdown_with_a_live_worker_kills_it_and_returns(tmp_path: Path) -> None:
    pids: list[int] = []

    async def start_and_abandon() -> None:
        async def ignore(*_: object) -> None:
            return None

        w = WorkerHandle(0, "cpu", [sys.executable, STUB], tmp_path / "models", tmp_path / "logs", ignore, ignore,
                         ready_timeout_s=60)
        await w.start()
        assert w.pid is not None
        pids.append(w.pid)
        # return without shutdown(): the reader task is still reading the live worker's stdout

    t0 = time.monotonic()
    asyncio.run(start_and_abandon())  # closing the loop cancels the reader
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker {pids[0]} still runs after the bot's loop ended")
