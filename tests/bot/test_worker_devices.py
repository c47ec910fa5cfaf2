"""Each GPU worker process is pinned to its own card (CUDA_VISIBLE_DEVICES), so no worker makes a CUDA context on
GPU 0 and every question about "the device" (bf16, memory) is asked of the card the worker runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.workers import WorkerHandle


def _handle(tmp_path: Path, device: str, env: dict[str, str]) -> WorkerHandle:
    async def ignore(*a: Any) -> None:
        return None

    return WorkerHandle(1, device, ["python", "-m", "trainer.jobs.worker"], tmp_path, tmp_path, ignore, ignore,
                        env=env)


def _device_arg(argv: list[str]) -> str:
    return argv[argv.index("--device") + 1]


def test_gpu_workers_see_only_their_own_card(tmp_path: Path) -> None:
    h = _handle(tmp_path, "cuda:1", {"PATH": "/usr/bin"})
    assert h._child_env()["CUDA_VISIBLE_DEVICES"] == "1" and _device_arg(h._argv()) == "cuda:0"
    assert h.device == "cuda:1"  # the bot still names the card as configured
    h = _handle(tmp_path, "cuda", {})
    assert h._child_env()["CUDA_VISIBLE_DEVICES"] == "0" and _device_arg(h._argv()) == "cuda:0"
    # the bot's own CUDA_VISIBLE_DEVICES is honoured: its cuda:1 is physical card 5
    h = _handle(tmp_path, "cuda:1", {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert h._child_env()["CUDA_VISIBLE_DEVICES"] == "5"
    cpu = _handle(tmp_path, "cpu", {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert cpu._child_env()["CUDA_VISIBLE_DEVICES"] == "4,5" and _device_arg(cpu._argv()) == "cpu"


def test_a_worker_on_a_card_that_is_not_there_is_refused_clearly(tmp_path: Path) -> None:
    h = _handle(tmp_path, "cuda:2", {"CUDA_VISIBLE_DEVICES": "4,5"})
    with pytest.raises(ValueError, match="cuda:2 does not exist.*2 GPU"):
        h._child_env()
