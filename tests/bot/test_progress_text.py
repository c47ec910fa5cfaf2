"""What the live progress message says, for a waiting job and a running one."""

from __future__ import annotations

from types import SimpleNamespace

from bot.progress import render


def job(state: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{"id": 7, "kind": "train", "state": state, "cancel_requested": False, "error": None,
                              **kw})


def test_queued_job_shows_position_and_start_estimate() -> None:
    text = render(job("queued"), {"position": 3, "queue_eta_s": 600})
    assert text.startswith("**Job #7** \u00b7 train \u00b7 queued")
    assert "Position in queue: **3** \u00b7 starts in ~10m00s" in text
    assert "Back in the queue" in render(job("queued"), {"position": 1, "resumed": True})
    assert "Waiting for a free worker." in render(job("queued"), {})


def test_running_job_shows_bar_step_loss_lr_speed_and_eta() -> None:
    st = {"step": 250, "total": 1000, "loss": 0.08312, "lr": 5e-5, "steps_per_s": 1.6, "eta_s": 469,
          "phase": "training"}
    text = render(job("running"), st)
    bar = "\u2588" * 5 + "\u2591" * 15
    assert f"`{bar}` 25% \u00b7 step 250/1000" in text
    assert "loss 0.0831 \u00b7 lr 5.00e-05 \u00b7 1.60 steps/s \u00b7 ETA 7m49s" in text, text
    cancelling = render(job("running", cancel_requested=True), st)
    assert "\u00b7 cancelling" in cancelling.splitlines()[0]
    done = render(job("succeeded"), {**st, "step": 1000})
    assert "100% \u00b7 step 1000/1000" in done and "ETA" not in done and "Results are posted below" in done
    failed = render(job("failed", error="out of GPU memory"), st)
    assert "Failed: out of GPU memory" in failed
