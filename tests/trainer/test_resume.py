"""Exact resume: stop a job after a saved state, call train() again, and end with the very weights of a run
that was never interrupted. Also the state format itself: no pickle, atomic folders, wrong-spec refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from trainer.events import JobCancelled, JobFailed
from trainer.train import state as st
from trainer.train.loop import train

VARIANTS = {
    # cached latents, text-encoder training with its own lr, gradient accumulation, cosine with warmup
    "adamw-te-accum": {"optimizer": {"name": "AdamW", "lr": 5e-3, "scheduler": "cosine", "warmup_steps": 2},
                       "network": {"train_text_encoder": True, "text_encoder_lr": 1e-3}, "grad_accum": 2},
    # uncached latents (seeded VAE samples), random flips, dropout, batches straddling epochs (3 images,
    # batch 2), Prodigy's extra group state, min-SNR and noise offset, kohya's three dropouts, multires and
    # input-perturbation noise (every random draw must repeat after a resume)
    "prodigy-flip-dropout": {"optimizer": {"name": "Prodigy", "lr": 1.0, "scheduler": "linear"},
                             "network": {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.2, "conv_dim": 2,
                                         "conv_alpha": 1}, "batch_size": 2,
                             "min_snr_gamma": 5.0, "noise_offset": 0.05, "multires_noise_iterations": 3,
                             "ip_noise_gamma": 0.1, "loss_type": "huber",
                             "data": {"resolution": 64, "cache_latents": False, "random_flip": True}},
    # a LyCORIS network (DoRA: LoRA factors and the trained magnitude) saved and restored through the state
    "dora": {"network": {"type": "dora"}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_gives_the_uninterrupted_weights(tmp_path: Path, dataset_factory, make_spec, stop_after,
                                                variant: str) -> None:
    folder = dataset_factory(tmp_path / "imgs", n=3, captions=("red dress", None, "blue hat, smiling"))
    spec = make_spec(folder, steps=6, state_every_n_steps=2, **VARIANTS[variant])

    full = load_file(train(spec, tmp_path / "full")["lora"])

    job = tmp_path / "job"
    s = stop_after(4)
    events: list[dict[str, Any]] = s.events
    with pytest.raises(JobCancelled):
        train(spec, job, on_event=s.sink, should_stop=s.stop)
    assert events[-1]["type"] == "cancelled" and events[-1]["step"] == 4
    assert [p.name for p in sorted((job / "state").iterdir())] == ["step-00000002", "step-00000004"]

    events.clear()
    out = train(spec, job, on_event=events.append)
    assert events[0] == {"type": "started", "kind": "train", "total_steps": 6, "resumed_from": 4}
    resumed = load_file(out["lora"])
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    # the loss history covers the whole run, not only the part after the resume
    hist = json.loads(Path(out["loss_history"]).read_text())
    assert hist["steps"] == [1, 2, 3, 4, 5, 6]


def test_state_refused_for_other_settings(tmp_path: Path, dataset: Path, make_spec, stop_after) -> None:
    spec = make_spec(dataset, steps=4, state_every_n_steps=2)
    with pytest.raises(JobCancelled):
        s = stop_after(2)
        train(spec, tmp_path / "job", on_event=s.sink, should_stop=s.stop)
    other = make_spec(dataset, steps=4, state_every_n_steps=2, optimizer={"lr": 1e-4})
    with pytest.raises(JobFailed) as e:
        train(other, tmp_path / "job")
    assert e.value.reason == "bad_state" and "different settings" in str(e.value)
    assert "optimizer.lr (saved " in str(e.value) and "now 0.0001)" in str(e.value)  # names what differs
    assert "network.dim" not in str(e.value)
    # output-only settings do not invalidate it
    same = make_spec(dataset, steps=4, state_every_n_steps=3, output_name="renamed", save_precision="bf16")
    out = train(same, tmp_path / "job")
    assert Path(out["lora"]).name == "renamed.safetensors"
    # a changed dataset is refused as well
    (dataset / "img_0.txt").write_text("a different caption")
    spec2 = make_spec(dataset, steps=6, state_every_n_steps=2)
    with pytest.raises(JobCancelled):
        s = stop_after(2)
        train(spec2, tmp_path / "job2", on_event=s.sink, should_stop=s.stop)
    (dataset / "img_1.txt").write_text("changed after the state was saved")
    with pytest.raises(JobFailed, match="dataset changed"):
        train(spec2, tmp_path / "job2")


def test_state_roundtrip_without_pickle(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.9))
    p.sum().backward()
    opt.step()
    s = st.TrainState(
        step=7, network={"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)},
        optimizer=opt.state_dict(), scheduler={"last_epoch": 7, "base_lrs": [1e-3], "_last_lr": [0.5e-3]},
        scaler={"scale": 65536.0, "_growth_tracker": 3}, rng=st.rng_states(),
        data={"micro_batch": 14, "epoch": 3}, loss_history=[[1, 0.5], [2, float("nan")]],
        extra={"bytes": b"\x00\x01", "nested": {1: (2, 3)}, "inf": float("inf")},
        spec_fingerprint="abc", data_fingerprint="def",
    )
    folder = st.save_state(tmp_path, s)
    assert sorted(x.name for x in folder.iterdir()) == ["state.json", "tensors.safetensors"]
    json.loads((folder / "state.json").read_text())  # plain JSON
    back = st.load_latest_state(tmp_path, "abc", "def")
    assert back is not None and back.step == 7
    assert torch.equal(back.network["lora_unet_x.lora_down.weight"], torch.ones(2, 3))
    assert back.optimizer["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(back.optimizer)
    assert back.extra == {"bytes": b"\x00\x01", "nested": {1: (2, 3)}, "inf": float("inf")}
    assert math.isnan(back.loss_history[1][1]) and back.scaler == {"scale": 65536.0, "_growth_tracker": 3}
    # RNG states go through JSON/safetensors and restore the stream exactly
    torch.manual_seed(5)
    s.rng = st.rng_states()
    expect = torch.rand(3)
    st.save_state(tmp_path / "rng", s)
    torch.rand(10)
    st.set_rng_states(st.load_latest_state(tmp_path / "rng").rng)
    assert torch.equal(torch.rand(3), expect)

    # the latest two are kept; a stale temp folder from a crash is cleaned; a damaged newest falls back
    for step in (8, 9):
        s.step = step
        st.save_state(tmp_path, s)
    (tmp_path / "state" / ".tmp-crashed").mkdir()
    s.step = 10
    st.save_state(tmp_path, s)
    assert sorted(x.name for x in (tmp_path / "state").iterdir()) == ["step-00000009", "step-00000010"]
    (tmp_path / "state" / "step-00000010" / "tensors.safetensors").write_bytes(b"garbage")
    assert st.load_latest_state(tmp_path, "abc").step == 9
    with pytest.raises(JobFailed, match="different settings"):
        st.load_latest_state(tmp_path, "other")


def test_more_steps_extend_a_finished_run(tmp_path: Path, dataset: Path, make_spec) -> None:
    """`--steps 6` after a 4-step run continues from step 4 with the cosine schedule re-planned over 6 steps;
    fewer steps than the state holds are refused naming `steps`; the summary counts this run and the total."""
    lr = 1e-3
    opt = {"lr": lr, "scheduler": "cosine", "warmup_steps": 0}
    train(make_spec(dataset, steps=4, optimizer=opt), tmp_path / "job")
    events: list[dict[str, Any]] = []
    out = train(make_spec(dataset, steps=6, optimizer=opt), tmp_path / "job", on_event=events.append)
    assert events[0]["resumed_from"] == 4
    replanned = [e["message"] for e in events if e["type"] == "log" and "re-planned" in e["message"]]
    assert replanned and "4 -> 6 steps" in replanned[0]
    assert f"lr now {lr * 0.5 * (1 + math.cos(math.pi * 4 / 6)):.3g}" in replanned[0]  # cosine at 4 of 6, not of 4
    summary = events[-1]["summary"]
    assert summary["steps"] == 6 and summary["resumed_from"] == 4 and summary["steps_this_run"] == 2
    # one speed figure: the summary repeats the bar's (and the bot's) last steps/s, not a figure of its own
    last = [e for e in events if e["type"] == "progress"][-1]
    assert last["step"] == 6 and summary["steps_per_s"] == last["steps_per_s"] > 0
    assert json.loads(Path(out["loss_history"]).read_text())["steps"] == [1, 2, 3, 4, 5, 6]
    saved = st.load_latest_state(tmp_path / "job")
    assert saved is not None and saved.extra["extensions"] == [{"at_step": 4, "from_steps": 4, "to_steps": 6}]
    with pytest.raises(JobFailed, match="at step 6, past steps = 5"):
        train(make_spec(dataset, steps=5, optimizer=opt), tmp_path / "job")
    with pytest.raises(JobFailed, match=r"different settings: network\.dim \(saved 4, now 8\); steps"):
        train(make_spec(dataset, steps=8, optimizer=opt, network={"dim": 8}), tmp_path / "job")


def test_a_cancelled_jobs_state_continues_in_another_job_folder(tmp_path: Path, dataset: Path, make_spec,
                                                                 stop_after) -> None:
    """The bot's /resume: a cancel saves the step reached; the new job's folder is seeded with that state (hard
    links) and the engine continues there, leaving the cancelled job's state as it was."""
    from bot.resume import saved_step, seed_state
    from storage.files import FileStore

    files = FileStore(tmp_path / "data")
    spec = make_spec(dataset, steps=5, state_every_n_steps=50)
    with pytest.raises(JobCancelled):
        s = stop_after(3)
        train(spec, files.make_job_dirs(1), on_event=s.sink, should_stop=s.stop)
    assert saved_step(files, 1) == 3  # the cancel saved it (the periodic state is every 50 steps)
    seed_state(files, 1, 2)
    events: list[dict[str, Any]] = []
    out = train(spec, files.make_job_dirs(2), on_event=events.append)
    summary = events[-1]["summary"]
    assert events[0]["resumed_from"] == 3 and summary["steps"] == 5 and summary["steps_this_run"] == 2
    assert json.loads(Path(out["loss_history"]).read_text())["steps"] == [1, 2, 3, 4, 5]
    assert saved_step(files, 1) == 3 and saved_step(files, 2) == 5
