"""`python -m bot demo` end to end: real worker process, the toy base (tiny SD1.5 without it), SQLite, artifacts,
the before/after grid job."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]



def test_demo_trains_a_kohya_lora(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    cmd = [sys.executable, "-m", "bot", "demo", "--data-dir", str(data), "--steps", "30"]
    if os.environ.get("LORAFORGE_TEST_WORKER_CMD"):  # run the suite against another engine build
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(f"[workers]\nworker_cmd = {os.environ['LORAFORGE_TEST_WORKER_CMD']}\n")
        cmd += ["--config", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("LoRA:")]
    assert lines, out.stdout
    lora = Path(lines[0].split(":", 1)[1].strip())
    assert lora.is_file() and lora.suffix == ".safetensors"

    # kohya format: lora_unet_* keys with lora_down/lora_up/alpha, ss_* metadata
    header_len = int.from_bytes(lora.read_bytes()[:8], "little")
    header = json.loads(lora.read_bytes()[8 : 8 + header_len])
    meta = header.pop("__metadata__", {})
    keys = list(header)
    assert keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert any(k.endswith(".lora_up.weight") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    assert "ss_network_dim" in meta

    # recorded in the database, with hashes
    with sqlite3.connect(data / "loraforge.db") as db:
        rows = db.execute("SELECT kind, path, bytes, sha256 FROM artifacts").fetchall()
        state = db.execute("SELECT state FROM jobs").fetchall()
    assert state == [("succeeded",), ("succeeded",)]  # the train job and its before/after grid job
    kinds = {r[0] for r in rows}
    assert {"lora", "plot", "sample", "grid"} <= kinds, rows
    assert all(r[2] > 0 and r[3] for r in rows)
    assert "sample:" in out.stdout and "loss curve:" in out.stdout
    grid = Path(next(ln for ln in out.stdout.splitlines() if ln.startswith("grid:")).split()[1])
    assert grid.is_file() and grid.suffix == ".png"
