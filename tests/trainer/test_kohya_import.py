"""`python -m trainer import-kohya`: kohya sd-scripts configs and command lines (examples from its docs, in
tests/trainer/data/kohya) become job files that train, with a short report of what was not translated."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from bot.interactions import read_job_attachment
from trainer.format.kohya import read_kohya
from trainer.jobs.cli import main
from trainer.kohya_read import parse_command_line

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "kohya"
IMAGES = ROOT / "examples" / "images"
TINY = ["--set", "base_model=tiny-sd15", "--set", "steps=2", "--set", "data.resolution=64", "--set", "batch_size=1",
        "--set", "save_every_n_steps=0", "--device", "cpu"]


@pytest.fixture
def kohya_dir(tmp_path: Path) -> Path:
    """The example files with the folders they name: images/ (dataset config), train/3_scs girl/ (train_data_dir)."""
    d = tmp_path / "kohya"
    shutil.copytree(DATA, d)
    shutil.copytree(IMAGES, d / "images")
    shutil.copytree(IMAGES, d / "train" / "3_scs girl")
    return d


def _import(capsys: pytest.CaptureFixture[str], src: Path) -> tuple[dict, str]:
    job = src.with_suffix(".job.toml")
    assert main(["import-kohya", str(src), "--out", str(job)]) == 0
    report = capsys.readouterr().out
    return tomllib.loads(job.read_text()), report


def _train(capsys: pytest.CaptureFixture[str], job: Path, out: Path, *extra: str) -> Path:
    rc = main(["run", str(job), *TINY, *extra, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return out


def test_the_docs_command_line_with_its_dataset_config(kohya_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    job, report = _import(capsys, kohya_dir / "train_network.sh")
    assert job["network"] == {"dim": 16, "alpha": 1.0, "conv_dim": 4, "conv_alpha": 1.0, "train_text_encoder": True}
    assert job["optimizer"] == {"lr": 1e-4, "name": "AdamW8bit", "scheduler": "constant"}
    assert job["mixed_precision"] == "fp16" and job["gradient_checkpointing"] is True and job["output_name"] == "my_lora"
    c = job["concepts"][0]
    assert Path(c["image_dir"]) == kohya_dir / "images" and c["repeats"] == 2 and c["instance_prompt"] == "scs girl"
    assert job["batch_size"] == 4 and job["data"] == {"keep_tokens": 2, "shuffle_tags": True, "resolution": 512}
    # 4 images x 2 repeats / batch 4 = 2 steps an epoch: 10 epochs, a LoRA every epoch
    assert job["steps"] == 20 and job["save_every_n_steps"] == 2
    assert "not needed here: " in report and "sdpa" in report and "not translated" not in report
    out = _train(capsys, kohya_dir / "train_network.job.toml", tmp_path / "run1", "--set", "optimizer.name=AdamW",
                 "--set", "mixed_precision=no")
    md = read_kohya(out / "outputs" / "my_lora.safetensors").metadata
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "1"
    assert "conv_dim" in md.get("ss_network_args", "")


def test_a_config_file_in_sections_with_repeat_folders(kohya_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    job, report = _import(capsys, kohya_dir / "config_file.toml")
    assert job["base_model"] == "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors"
    assert job["network"]["conv_dim"] == 8 and job["network"]["text_encoder_lr"] == 5e-5
    assert job["optimizer"]["lr"] == 1e-4 and job["optimizer"]["name"] == "Lion"  # unet_lr wins, as in kohya
    assert job["optimizer"]["scheduler"] == "cosine_with_restarts" and job["optimizer"]["num_cycles"] == 3
    assert job["concepts"] == [{"image_dir": str(kohya_dir / "train" / "3_scs girl"), "repeats": 3,
                                "instance_prompt": "scs girl", "caption_mode": "caption_only"}]
    assert job["steps"] == 24 and job["save_every_n_steps"] == 12  # 4 images x 3 repeats / batch 2 = 6 an epoch
    assert job["data"]["bucketing"] is True and job["min_snr_gamma"] == 5.0 and job["seed"] == 42
    assert "not translated: clip_skip = 2" in report
    # sample_prompts: kohya's prompt file (--n --w --h --d --l --s), every 2 epochs, k_euler_a
    first, second = job["sample"]["prompts"]
    assert first["prompt"].endswith("simple background") and first["negative_prompt"].startswith("low quality")
    assert (first["width"], first["height"], first["seed"], first["cfg"], first["steps"]) == (768, 768, 1, 7.5, 28)
    assert (second["width"], second["height"], second["sampler"]) == (576, 832, "euler_a")
    assert job["sample"]["every_n_steps"] == 12
    _train(capsys, kohya_dir / "config_file.job.toml", tmp_path / "run2", "--set", "mixed_precision=no",
           "--set", "data.bucketing=false", "--set", "sample.prompts=[]")
    assert (tmp_path / "run2" / "outputs" / "scs-style v2.safetensors").is_file()


def test_the_config_readme_dataset_example_says_what_it_left_out(kohya_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    job, report = _import(capsys, kohya_dir / "config_readme.toml")
    assert [c["instance_prompt"] for c in job["concepts"]] == ["hoge girl", "fuga boy"]
    assert job["concepts"][0]["image_dir"] == "C:\\hoge"  # a Windows path is kept as written
    assert "2 datasets" in report and "is_reg" in report and "keep_tokens = 3" in report
    # The folders are on the user's other machine: --images points at this one's.
    _train(capsys, kohya_dir / "config_readme.job.toml", tmp_path / "run3", "--images", str(IMAGES))
    assert (tmp_path / "run3" / "outputs" / "lora.safetensors").is_file()


def test_command_lines_as_saved_on_windows() -> None:
    text = ('accelerate launch train_network.py ^\n --train_data_dir="C:\\data\\train" ^\n'
            ' --network_args "conv_dim=4" "conv_alpha=1" --network_train_unet_only --resolution 768,768\n')
    args = parse_command_line(text)
    assert args == {"train_data_dir": "C:\\data\\train", "network_args": ["conv_dim=4", "conv_alpha=1"],
                    "network_train_unet_only": True, "resolution": "768,768"}


def test_train_job_file_takes_a_kohya_config() -> None:
    """/train job_file: a kohya config is translated; the bot's dataset gives the images; a model path keeps its
    file name, which is looked up in the bot's model list."""
    values, note = read_job_attachment("config_file.toml", (DATA / "config_file.toml").read_bytes())
    assert values["network"]["dim"] == 32 and values["base_model"] == "v1-5-pruned-emaonly.safetensors"
    assert "clip_skip" in note and "max_train_epochs" in note  # the epochs cannot be counted without the folders
    job = b'base_model = "tiny-sd15"\nsteps = 5\n'
    assert read_job_attachment("job.toml", job) == ({"base_model": "tiny-sd15", "steps": 5}, "")
    values, note = read_job_attachment("run.sh", (DATA / "train_network.sh").read_bytes())
    assert values["optimizer"]["name"] == "AdamW8bit" and "Imported" in note


def test_loss_and_noise_options_keep_kohyas_names() -> None:
    from trainer.kohya_import import translate
    from trainer.spec import parse_job

    args = {"loss_type": "smooth_l1", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 1.5,
            "min_timestep": 100, "max_timestep": 900, "zero_terminal_snr": True, "debiased_estimation_loss": True,
            "scale_v_pred_loss_like_noise_pred": True, "v_pred_like_loss": 0.1, "multires_noise_iterations": 6,
            "multires_noise_discount": 0.3, "noise_offset": 0.05, "adaptive_noise_scale": 0.01,
            "noise_offset_random_strength": True, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}
    out = translate({**args, "network_dim": 8})
    assert not out.untranslated, out.untranslated
    assert {k: out.values[k] for k in args} == args
    spec = parse_job({**out.values, "concepts": [{"image_dir": "x"}]})
    assert spec.huber_schedule == "exponential" and spec.max_timestep == 900
    # a job from a kohya config averages prior-preservation batches as kohya does
    assert out.values["imported_from"] == "kohya" and spec.resolved_prior_loss_form == "kohya"


def test_network_weights_become_init_lora() -> None:
    from trainer.kohya_import import translate

    out = translate({"network_dim": 8, "network_weights": "/loras/first.safetensors"})
    assert out.values["init_lora"] == "/loras/first.safetensors" and "network_weights" not in out.untranslated


@pytest.mark.parametrize(("given", "kept"), [("0.1", 0.1), ("10%", 0.1), (0.05, 0.05), ("50", 50), (30, 30)])
def test_lr_warmup_steps_as_kohya_reads_it(given: object, kept: float) -> None:
    """kohya's int_or_float: below 1 (or "N%") a share of max_train_steps, kept as a share (200 -> 20 steps)."""
    from trainer.kohya_import import translate
    from trainer.spec import parse_job

    out = translate({"network_dim": 8, "max_train_steps": 200, "lr_warmup_steps": given})
    assert out.values["optimizer"]["warmup_steps"] == kept
    spec = parse_job({**out.values, "concepts": [{"image_dir": "x"}]})
    assert spec.optimizer.resolved_warmup(spec.steps) == (int(kept * 200) if kept < 1 else kept)
    # the kohya_ss GUI's percent field is the same share
    gui = translate({"network_dim": 8, "max_train_steps": 200, "lr_warmup": 10})
    assert gui.values["optimizer"]["warmup_steps"] == 0.1


def test_lycoris_network_module_sets_the_network_type() -> None:
    from trainer.kohya_import import translate
    from trainer.kohya_read import parse_command_line

    def net_type(args: dict) -> tuple[str | None, list[str]]:
        out = translate({"network_dim": 8, **args})
        return out.values.get("network", {}).get("type"), out.untranslated

    line = ('accelerate launch train_network.py --network_module=lycoris.kohya --network_dim=8 '
            '--network_args "algo=lokr" "conv_dim=4" "factor=8"')
    t, lost = net_type(parse_command_line(line))
    assert t == "lokr" and translate(parse_command_line(line)).values["network"]["factor"] == 8
    line = line.replace('"factor=8"', '"decompose_both=True"')
    assert any("decompose_both=True" in x for x in net_type(parse_command_line(line))[1])  # no equivalent: reported
    assert net_type({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True"]})[0] == "dora"
    assert net_type({"network_module": "lycoris.kohya", "network_args": ["algo=loha"]})[0] == "loha"
    assert net_type({"LoRA_type": "LyCORIS/LoHa"})[0] == "loha"
    t, lost = net_type({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]})
    assert t is None and any("algo=ia3 is not offered: ComfyUI cannot load IA3" in x for x in lost)
    # LyCORIS' attn-only preset is the attention-only module set; presets without an equivalent are reported
    out = translate({"network_dim": 8, "network_module": "lycoris.kohya", "network_args": ["preset=attn-only"]})
    assert out.values["network"]["unet_modules"] == "attention" and not out.untranslated
    out = translate({"network_dim": 8, "network_module": "lycoris.kohya", "network_args": ["preset=attn-mlp"]})
    assert "unet_modules" not in out.values["network"] and any("preset=attn-mlp" in x for x in out.untranslated)


def test_masked_loss_and_conditioning_data_dir_become_mask_dir(tmp_path: Path) -> None:
    """kohya's --masked_loss reads each subset's masks from its conditioning_data_dir (same file names)."""
    from trainer.kohya_import import translate

    cfg = {"datasets": [{"subsets": [{"image_dir": "img", "conditioning_data_dir": "masks"}]}]}
    out = translate({"network_dim": 8, "masked_loss": True, **cfg}, tmp_path)
    assert out.values["masked_loss"] is True and not out.untranslated, out.untranslated
    assert out.values["concepts"][0]["mask_dir"] == str(tmp_path / "masks")
    bot = translate({"network_dim": 8, "masked_loss": True, **cfg}, tmp_path, for_bot=True)
    assert "masked_loss" not in bot.values and any("no mask folder" in u for u in bot.untranslated)


def test_validation_settings_keep_kohyas_names() -> None:
    from trainer.kohya_import import translate

    out = translate({"network_dim": 8, "validation_split": "0.1", "validation_seed": 7, "validate_every_n_steps": 50})
    assert (out.values["validation_split"], out.values["validation_seed"], out.values["validate_every_n_steps"]) \
        == (0.1, 7, 50)
    assert not out.untranslated, out.untranslated
