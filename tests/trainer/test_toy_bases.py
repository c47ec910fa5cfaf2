"""The toy bases are built-in names like the tiny models: resolved, listed, their architecture known without
loading them, and a missing file says how to re-create it. The pretraining script is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.config import BUILTIN_MODELS, list_base_models
from trainer.format import checkpoint
from trainer.format.checkpoint import TOY_BASES, builtin_arch
from trainer.models.base import ModelError
from trainer.models.load import resolve_model_ref


def test_toy_names_are_built_in_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert builtin_arch("toy-sd15") == "sd1" and builtin_arch("toy-sdxl") == "sdxl"
    assert BUILTIN_MODELS[:2] == ("toy-sd15", "toy-sdxl")  # listed first: what a fresh install offers
    assert "tiny-sd15" in BUILTIN_MODELS
    monkeypatch.setattr(checkpoint, "TOY_BASES_DIR", tmp_path)
    (tmp_path / "toy-sd15.safetensors").write_bytes(b"")
    listed = dict(list_base_models("/nonexistent"))
    assert "toy world" in listed["toy-sd15"] and "random weights" in listed["tiny-sd15"]
    assert "toy-sdxl" not in listed  # not there, not offered


def test_a_missing_toy_base_says_how_to_recreate_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(checkpoint, "TOY_BASES_DIR", tmp_path)
    with pytest.raises(ModelError, match="pretrain_toy_bases.py"):
        resolve_model_ref("toy-sd15")


def test_pretraining_is_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seed gives the same weights (a few steps of each stage, twice)."""
    from trainer.toy import pretrain as P

    recipe = P.Recipe(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, images=8, vae_images=8)

    def run() -> dict[str, torch.Tensor]:
        base = P.skeleton("sd15")
        P.train_vae(base.vae, recipe, say=lambda _: None)
        P.train_unet(base, recipe, say=lambda _: None)
        return {**base.vae.state_dict(), **{f"unet.{k}": v for k, v in base.unet.state_dict().items()}}

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = P.skeleton("sd15").unet.state_dict()
    assert not all(torch.equal(a[f"unet.{k}"], v) for k, v in fresh.items())  # it did train
    assert set(TOY_BASES) == {f"toy-{layout}" for layout in P.LAYOUTS}


def test_a_toy_file_loads_with_its_own_config(tmp_path: Path) -> None:
    """The toy layouts share the tiny UNets; the file's metadata picks the toy config (its VAE normalises all
    channels together), through the same single-file loader as any checkpoint."""
    from trainer.models.load import load_base
    from trainer.models.single_file import save_single_file
    from trainer.toy import pretrain as P

    base = P.skeleton("sd15")
    toy = save_single_file(base, tmp_path / "toy.safetensors", metadata={"loraforge.config": "toy-sd15"})
    loaded = load_base(toy)
    assert loaded.vae.config.norm_num_groups == 1 and loaded.extra["config"] == "toy-sd15"
    assert torch.equal(loaded.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert loaded.tokenizers[0]("red circle").input_ids == base.tokenizers[0]("red circle").input_ids
    plain = load_base(save_single_file(base, tmp_path / "plain.safetensors"))
    assert plain.vae.config.norm_num_groups == 4 and plain.extra["config"] == "tiny-sd15"
