"""`[executor]`: local worker processes stay the default and need no Ray; a bad kind names the key; what a Ray job
asks for and the refusal of one no node can hold (pure functions: no Ray needed). The cluster tests are
tests/cogs/test_ray.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, config_from_dict
from bot.ray_executor import refusal, vram_needed_gb

ROOT = Path(__file__).resolve().parents[2]


def test_local_is_the_default_and_imports_no_ray(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from bot.config import config_from_dict\n"
        "from bot.scheduler import Scheduler\n"
        "from storage.files import FileStore\n"
        "import bot.app, bot.service, cogs.admin\n"
        f"cfg = config_from_dict({{'paths': {{'data_dir': {str(tmp_path)!r}}}}})\n"
        "assert cfg.executor.kind == 'local'\n"
        "s = Scheduler(None, FileStore(cfg.data_dir), cfg)\n"
        "assert [type(w).__name__ for w in s.workers] == ['WorkerHandle'], s.workers\n"
        "assert 'ray' not in sys.modules and 'bot.ray_executor' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unknown_executor_kind_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"executor\.kind"):
        config_from_dict({"executor": {"kind": "k8s"}})
    cfg = config_from_dict({"executor": {"kind": "ray", "address": "10.0.0.5:6379", "gpus_per_job": 1}})
    assert cfg.executor.address == "10.0.0.5:6379" and cfg.executor.slots == 0


def test_refusal_names_each_missing_resource() -> None:
    nodes = [{"resources": {"CPU": 8.0, "GPU": 1.0, "vram_gb": 24.0}}, {"resources": {"CPU": 4.0, "vram_gb": 8.0}}]
    assert refusal({"CPU": 1.0, "GPU": 1.0, "vram_gb": 9.0}, nodes) is None
    assert refusal({"GPU": 2.0}, nodes) == ("no node of the Ray cluster can run this job: it needs 2 GPU(s) but the "
                                            "largest node offers 1")
    # each resource exists somewhere, never together on one node
    assert "no single node" in str(refusal({"CPU": 6.0, "GPU": 1.0, "vram_gb": 24.0}, [
        {"resources": {"CPU": 8.0, "vram_gb": 8.0}}, {"resources": {"CPU": 2.0, "GPU": 1.0, "vram_gb": 24.0}}]))
    assert "no live node" in str(refusal({"CPU": 1.0}, []))
    # SDXL at 1024 px batch 4 asks for more than an 8 GB node has; SD1.5 at 512 px fits it
    sdxl = {"kind": "train", "base_model": "sdxl", "concepts": [{"image_dir": "/x"}], "batch_size": 4,
            "data": {"resolution": 1024}}
    sd15 = {"kind": "train", "base_model": "sd15", "concepts": [{"image_dir": "/x"}], "data": {"resolution": 512}}
    assert 8 < vram_needed_gb(sdxl, None) <= 24 and vram_needed_gb(sd15, None) <= 8  # type: ignore[operator]
