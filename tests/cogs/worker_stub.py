"""A torch-free stand-in for `python -m trainer.jobs.worker`: the same JSON-lines protocol, instant results.

The one protocol-speaking fake worker of the test suite: the scheduler tests (tests/bot) and the cog
tests (tests/cogs, the ack-latency benchmark) both start it as ``worker_cmd``. It accepts the
``--device``/``--models-dir`` arguments the scheduler passes.

Behaviour per job from the spec's output_name prefix:
  "fast"  (default) started, `steps` progress events at once, a sample, a lora, grid and plot, finished
  "slow"  like fast, sleeping STUB_STEP_S (default 0.05 s) per step; cancellable between steps
  "...live..."  also writes a live preview (live/preview.png + a "preview" event) at every step
  "big"   like fast but the lora is 64 KiB of random bytes (for the size-limit tests)
  "fail"  started, a few steps, then failed with reason "nan"
  "stall" started, then nothing (ignores cancel) - for the stall watchdog
  "crash" started, then the process segfaults (SIGSEGV)
  "oom"   started, prints a CUDA OOM to stderr, exits 1
Spec fields it follows as the engine does: ``save_every_n_steps`` (an intermediate `<name>-stepNNNNNNNN.safetensors`
with a `file` event before the final one, listed in outputs["intermediate"]) and ``keep_best`` (`<name>-best.safetensors`
written at step 1 and again at the middle step, a `file` event with role "best" each time, in outputs["best_lora"],
and the best step and validation losses in the summary).
A merge spec with ``into_checkpoint`` writes one "checkpoint" file (no lora, grid or plot), as the engine does.
Resume: a job started again finds its newest state (`state/step-<n>/state.json`, as the engine names them; written
every 5 steps and on a cancel) and reports resumed_from.
Every job id it starts is appended to $FAKE_WORKER_LOG (one line each), so tests can check that
no job ran twice. With $STUB_DUMP_ENV set it writes its whole environment to stderr (its worker log).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

lock = threading.Lock()
cancelled: set[int] = set()
jobs: list[dict] = []
cond = threading.Condition()


def send(msg: dict) -> None:
    with lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def ev(job_id: int, **e: object) -> None:
    send({"type": "event", "job_id": job_id, "event": e})


def png(w: int = 8, h: int = 8, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def reader() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        with cond:
            if cmd["cmd"] == "run":
                jobs.append(cmd)
            elif cmd["cmd"] == "cancel":
                cancelled.add(int(cmd["job_id"]))
            elif cmd["cmd"] == "shutdown":
                jobs.append({"cmd": "shutdown"})
            cond.notify_all()
    with cond:
        jobs.append({"cmd": "shutdown"})
        cond.notify_all()


def die_early(name: str) -> None:
    """The failure modes that never reach a step: a hang, a segfault, a CUDA out-of-memory exit."""
    if name.startswith("stall"):
        time.sleep(3600)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("oom"):
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)


def save_state(job_dir: Path, step: int) -> None:
    folder = job_dir / "state" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))


def run(cmd: dict) -> None:
    job_id = int(cmd["job_id"])
    spec = cmd["spec"]
    job_dir = Path(cmd["job_dir"])
    name = str(spec.get("output_name", "fast"))
    steps = int(spec.get("steps", 3))
    step_s = float(os.environ.get("STUB_STEP_S", "0.05")) if name.startswith("slow") else 0.0
    if os.environ.get("FAKE_WORKER_LOG"):
        with open(os.environ["FAKE_WORKER_LOG"], "a") as f:
            f.write(f"{job_id}\n")
    intermediate: list[str] = []
    start = max((int(p.parent.name.split("-")[1]) for p in (job_dir / "state").glob("step-*/state.json")), default=0)
    ev(job_id, type="started", total_steps=steps, kind=spec.get("kind"), resumed_from=start)
    die_early(name)
    ev(job_id, type="phase", name="training")
    for s in range(start + 1, steps + 1):
        if job_id in cancelled:
            if s - 1 > start:
                save_state(job_dir, s - 1)  # as the engine does: a cancel keeps every step done
            ev(job_id, type="cancelled", outputs={}, step=s - 1)
            send({"type": "done", "job_id": job_id, "state": "cancelled", "error": None})
            return
        if step_s:
            time.sleep(step_s)
        ev(job_id, type="progress", step=s, total=steps, loss=1.0 / s, lr=1e-4, steps_per_s=20.0,
           eta_s=(steps - s) * max(step_s, 0.001))
        if "live" in name:  # a live preview of the picture forming, as trainer.infer.live writes it
            live = job_dir / "live" / "preview.png"
            live.parent.mkdir(parents=True, exist_ok=True)
            live.write_bytes(png(rgb=(min(255, 10 * s), 40, 40)))
            ev(job_id, type="preview", path=str(live), step=s, total=steps, label="seed 1111")
        if s % 5 == 0:
            save_state(job_dir, s)
        if spec.get("keep_best") and s in (1, max(1, steps // 2)):  # a new best at step 1, then at the middle
            best = job_dir / "outputs" / f"{name}-best.safetensors"
            best.parent.mkdir(parents=True, exist_ok=True)
            best.write_bytes(f"stub best lora {job_id} step {s}".encode())
            ev(job_id, type="file", kind="lora", path=str(best), step=s, role="best")
        every = int(spec.get("save_every_n_steps") or 0)
        if every and s % every == 0 and s < steps:
            inter = job_dir / "outputs" / f"{name}-step{s:08d}.safetensors"
            inter.parent.mkdir(parents=True, exist_ok=True)
            inter.write_bytes(b"stub intermediate lora " + str(s).encode())
            intermediate.append(str(inter))
            ev(job_id, type="file", kind="lora", path=str(inter), step=s)
        if name.startswith("fail") and s >= 2:
            ev(job_id, type="failed", error="the loss became NaN at step 2", reason="nan")
            send({"type": "done", "job_id": job_id, "state": "failed", "error": "the loss became NaN at step 2"})
            return
    out = job_dir / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("kind") == "merge" and spec.get("into_checkpoint"):
        ckpt = out / f"{name}.safetensors"
        ckpt.write_bytes(b"stub checkpoint " + str(job_id).encode())
        ev(job_id, type="file", kind="checkpoint", path=str(ckpt), step=steps)
        ev(job_id, type="finished", outputs={"checkpoint": str(ckpt)}, summary={})
        send({"type": "done", "job_id": job_id, "state": "succeeded", "error": None})
        return
    samples = job_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    sample = samples / f"sample-{steps:06d}-0.png"
    sample.write_bytes(png(rgb=(10, 200, 10)))
    ev(job_id, type="sample", path=str(sample), step=steps, prompt="a red circle")
    lora = out / f"{name}.safetensors"
    lora.write_bytes(os.urandom(64 * 1024) if name.startswith("big") else b"stub lora " + str(job_id).encode())
    grid = out / "grid.png"
    grid.write_bytes(png())
    plot = out / "loss.png"
    plot.write_bytes(png(rgb=(0, 0, 200)))
    for kind, p in (("lora", lora), ("grid", grid), ("plot", plot)):
        ev(job_id, type="file", kind=kind, path=str(p), step=steps)
    outputs: dict[str, object] = {"lora": str(lora), "grid": str(grid), "plot": str(plot)}
    # the engine's own keys, with the raw floats it sends (trainer/train/loop.py)
    summary = {"steps": steps, "resumed_from": 0, "elapsed_s": 65.22395266000001, "steps_per_s": 3.0666666666,
               "first_loss": 0.51234567, "final_loss": 1.0 / steps + 1e-9, "device": "cpu",
               "prediction_type": "epsilon", "lora_bytes": lora.stat().st_size}
    if intermediate:
        outputs["intermediate"] = intermediate
    if spec.get("keep_best"):  # the validation loss was lowest at the middle step (trainer/train/validation.py)
        outputs["best_lora"] = str(out / f"{name}-best.safetensors")
        summary.update(validation_loss=0.1234567, best_validation_step=max(1, steps // 2),
                       best_validation_loss=0.0987654)
    ev(job_id, type="finished", outputs=outputs, summary=summary)
    send({"type": "done", "job_id": job_id, "state": "succeeded", "error": None})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--models-dir", default=None)
    args, _ = p.parse_known_args()
    if os.environ.get("STUB_DUMP_ENV"):  # the environment it was given, into its log (tests/bot/test_worker_env.py)
        print("\n".join(f"ENV {k}={v}" for k, v in sorted(os.environ.items())), file=sys.stderr, flush=True)
    threading.Thread(target=reader, daemon=True).start()
    send({"type": "ready", "pid": os.getpid(), "device": args.device})
    while True:
        with cond:
            while not jobs:
                cond.wait()
            cmd = jobs.pop(0)
        if cmd["cmd"] == "shutdown":
            return
        run(cmd)


if __name__ == "__main__":
    main()
