"""One rule for what a base model name names: the engine (load, plan, CLI checks) and the bot's model list."""

from __future__ import annotations

import shutil
from pathlib import Path

from bot.config import is_listed_base_model, list_base_models
from trainer.models.load import load_base, resolve_model_ref
from trainer.models.single_file import materialize_tiny_single_file
from trainer.plan import model_config_name


def test_a1111_models_folder_names_resolve_as_the_bot_lists_them(tmp_path: Path) -> None:
    models = tmp_path / "models"  # an A1111 install's models folder
    sd = models / "Stable-diffusion"
    sd.mkdir(parents=True)
    ckpt = sd / "mymodel.safetensors"
    shutil.copy(materialize_tiny_single_file("tiny-sd15"), ckpt)
    (sd / "old.ckpt").write_bytes(b"never listed")

    names = [n for n, _ in list_base_models(models)]
    assert "Stable-diffusion/mymodel.safetensors" in names and not any("old" in n for n in names)
    for name in ("mymodel", "mymodel.safetensors", "Stable-diffusion/mymodel.safetensors"):
        assert is_listed_base_model(name, models), name
        assert resolve_model_ref(name, models) == ckpt, name
    assert not is_listed_base_model("../mymodel", models) and not is_listed_base_model("old", models)
    assert model_config_name("mymodel", models_dir=models) == model_config_name("sd15")  # the plan finds it too
    assert load_base("mymodel", models).arch == "sd1"
