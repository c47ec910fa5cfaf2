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
    assert "loss 0.0831 \u00b7 lr 5.00e-05 \u00b7 1.6 steps/s \u00b7 ETA 7m49s" in text, text
    cancelling = render(job("running", cancel_requested=True), st)
    assert "\u00b7 cancelling" in cancelling.splitlines()[0]
    done = render(job("succeeded"), {**st, "step": 1000})
    assert "100% \u00b7 step 1000/1000" in done and "ETA" not in done and "Results are posted below" in done
    failed = render(job("failed", error="out of GPU memory"), st)
    assert "Failed: out of GPU memory" in failed


def test_training_phase_is_not_a_stale_counter_beside_the_step_line() -> None:
    # The engine names the training loop once, as phase "training" (0/200); the step line counts from there.
    st = {"phase": "training", "phase_current": 0, "phase_total": 200, "step": 120, "total": 200,
          "steps_per_s": 2.0}
    text = render(job("running"), st)
    assert "step 120/200" in text and "(0/200)" not in text and "Phase: training" not in text, text
    # before the first step too: the bar says 0/200 once, not twice
    text = render(job("running"), {"phase": "training", "phase_current": 0, "phase_total": 200, "total_steps": 200})
    assert text.count("0/200") == 1, text
    # other phases keep their own counter
    text = render(job("running"), {"phase": "caching latents", "phase_current": 12, "phase_total": 40,
                                   "total_steps": 200})
    assert "Phase: caching latents (12/40)" in text
