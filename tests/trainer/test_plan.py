"""The memory plan: calibrated against the VRAM figures in shared/facts.md s.4, honest about what fits, and usable
from the CLI and the bot (torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.format.checkpoint import CONFIGS_DIR
from trainer.jobs.cli import main
from trainer.plan import GiB, PlanError, choose_auto, model_config_name, parse_size, plan_job, table
from trainer.spec import list_presets, parse_job

ROOT = Path(__file__).resolve().parents[2]


def _spec(base: str, res: int, **over: Any) -> Any:
    values: dict[str, Any] = {"base_model": base, "mixed_precision": "bf16", "data": {"resolution": res},
                              "optimizer": {"name": "AdamW8bit"}, "network": {"dim": 16}}
    values.update(over)
    return parse_job(values)


# facts.md s.4: "VRAM floor, batch 1, bf16 weights, flash attention: SD1.5 ~2.7 GiB (2.0 with checkpointing);
# SDXL ~11.7 GiB (~6 with checkpointing)". Reference job: cached latents and text-encoder outputs, rank 16,
# AdamW8bit; the figure is the training peak torch allocates (the CUDA context comes on top).
FACTS = [("sd15", 512, False, 2.7), ("sd15", 512, True, 2.0), ("sdxl", 1024, False, 11.7), ("sdxl", 1024, True, 6.0)]


@pytest.mark.parametrize(("base", "res", "gc", "gib"), FACTS, ids=[f"{b}-{r}-gc{g}" for b, r, g, _ in FACTS])
def test_plan_is_within_15_percent_of_the_published_floor(base: str, res: int, gc: bool, gib: float) -> None:
    plan = plan_job(_spec(base, res, gradient_checkpointing=gc))
    assert plan.peak_phase == "training"
    err = plan.allocated / GiB / gib - 1
    assert abs(err) <= 0.15, f"{base} {res} gc={gc}: planned {plan.allocated / GiB:.2f} GiB vs {gib} ({err:+.1%})"


def test_the_user_message_names_the_setting_and_the_card() -> None:
    plan = plan_job(_spec("sdxl", 1024, batch_size=2, gradient_checkpointing=False), card_bytes=10 * GiB)
    assert plan.fits is False
    msg = plan.message()
    assert msg.startswith("SDXL 1024 batch 2 needs ~")
    assert "with gradient checkpointing ~" in msg and "your card has 10.0 GB" in msg
    assert "turn gradient checkpointing on" in msg
    assert plan.with_checkpointing is not None and plan.with_checkpointing.fits  # the advice is true
    assert "SDXL 1024 batch 2" in plan.summary()


def test_bigger_jobs_need_more() -> None:
    base = plan_job(_spec("sdxl", 1024, gradient_checkpointing=True)).total
    assert plan_job(_spec("sdxl", 1024, gradient_checkpointing=True, batch_size=4)).total > base
    assert plan_job(_spec("sdxl", 1024, gradient_checkpointing=False)).total > base
    assert plan_job(_spec("sdxl", 1024, gradient_checkpointing=True, mixed_precision="no")).total > base
    adamw = _spec("sdxl", 1024, gradient_checkpointing=True, optimizer={"name": "AdamW"})
    assert plan_job(adamw).parts["optimizer state (AdamW)"] == 4 * plan_job(
        _spec("sdxl", 1024, gradient_checkpointing=True)).parts["optimizer state (AdamW8bit)"]
    live_text = _spec("sdxl", 1024, gradient_checkpointing=True, data={"resolution": 1024, "shuffle_tags": True})
    assert plan_job(live_text).parts["text encoder weights"] > 0  # captions vary: the encoders stay on the GPU
    assert plan_job(_spec("sdxl", 1024, gradient_checkpointing=True)).parts["text encoder weights"] == 0


def test_samples_at_1024_on_sdxl_count_the_vae_decode() -> None:
    sampled = _spec("sdxl", 1024, gradient_checkpointing=True, sample={"prompts": [{"prompt": "a cat"}]})
    plan = plan_job(sampled)
    assert plan.phases["samples"] > 8 * GiB  # UNet + fp32 VAE + a ~3 GiB fp32 decode at 1024 px


def test_auto_settings_pick_the_cheapest_that_fits() -> None:
    sd15 = parse_job({"base_model": "sd15", "data": {"resolution": 512}, "optimizer": {"name": "AdamW8bit"}})
    assert choose_auto(sd15, 8 * GiB)["gradient_checkpointing"] is False
    sdxl = parse_job({"base_model": "sdxl", "data": {"resolution": 1024}, "optimizer": {"name": "AdamW8bit"}})
    on10 = choose_auto(sdxl, 10 * GiB)
    assert on10["gradient_checkpointing"] is True and on10["plan"].fits
    assert on10["cache_text_encoder_outputs"] is True
    assert choose_auto(sdxl, 80 * GiB)["gradient_checkpointing"] is False


def test_architecture_of_the_base_model() -> None:
    assert model_config_name("tiny-sdxl") == "tiny-sdxl"
    assert model_config_name("toy-sd15") == "toy-sd15"  # its own config: a 4x VAE
    assert model_config_name("anything", arch="SD15") == "sd15"
    assert model_config_name(str(CONFIGS_DIR / "sdxl")) == "sdxl"  # a diffusers folder, by its configs
    with pytest.raises(PlanError, match="cannot tell the architecture"):
        model_config_name("no-such-model")
    with pytest.raises(PlanError, match="unknown architecture"):
        model_config_name("x", arch="flux")
    assert parse_size("10GiB") == parse_size("10 gb") == 10 * GiB
    assert parse_size("10240MiB") == 10 * GiB
    with pytest.raises(PlanError):
        parse_size("lots")


def test_table_matches_the_shipped_configs() -> None:
    """trainer/plan_table.json is regenerated by `python -m trainer.plan_count` after a config change: a changed
    config changes its parameter counts or LoRA widths, checked here on the meta device (the activation counts take
    a minute, so they are not recounted here)."""
    from trainer.models.base import meta_model
    from trainer.plan_count import _lora_sums, vae_factor

    for name in ("tiny-sd15", "tiny-sdxl", "toy-sd15", "toy-sdxl", "sd15"):
        base = meta_model(CONFIGS_DIR / name)
        stored = table()[name]
        assert stored["vae_factor"] == vae_factor(base.vae), name
        assert stored["params"]["unet"] == sum(p.numel() for p in base.unet.parameters()), name
        assert stored["params"]["text_encoders"] == [sum(p.numel() for p in t.parameters())
                                                     for t in base.text_encoders], name
        assert stored["lora"] == json.loads(json.dumps(_lora_sums(base))), name
    assert table()["sdxl"]["params"]["text_encoders"] == [123060480, 694659840]


def test_the_plan_module_does_not_import_torch() -> None:
    code = ("import sys, trainer.plan as p, trainer.spec as s; "
            "p.plan_job(s.parse_job({'base_model': 'sdxl'})); assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_cli_plans_every_preset_on_every_architecture(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    for arch, label in (("sd15", "SD1.5"), ("sd2", "SD2"), ("sdxl", "SDXL")):
        assert main(["plan", "--preset", preset, "--arch", arch, "--vram", "24GiB"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(label + " ") and "your card has 24.0 GB" in out and "UNet weights" in out


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.toml"
    job.write_text('base_model = "sdxl"\nbatch_size = 8\ngradient_checkpointing = false\n'
                   "[data]\nresolution = 1024\n")
    assert main(["plan", str(job), "--vram", "8GiB"]) == 1
    assert "turn gradient checkpointing on" in capsys.readouterr().out
    assert main(["plan", str(job), "--vram", "80GiB"]) == 0
    assert main(["plan", str(job), "--vram", "eight"]) == 2
    assert main(["plan", str(tmp_path / "missing.toml"), "--vram", "8GiB"]) == 2
    assert main(["plan", str(job), "--arch", "flux", "--vram", "8GiB"]) == 2
    job.write_text('base_model = "no-such-model"\n')
    assert main(["plan", str(job), "--vram", "8GiB"]) == 2
    assert "name it (sd15, sd2 or sdxl)" in capsys.readouterr().err
