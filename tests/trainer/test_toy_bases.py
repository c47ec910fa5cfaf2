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

# Figure and colour right in at least this share of 12 samples (measured: docs/toy-world.md, Status).
# toy-sd15: 92% of these 12 (92% of 48); toy-sdxl: 92% of these 12 (94% of 48).
SHIPPED_MIN = {"toy-sd15": 0.75, "toy-sdxl": 0.75}


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
    """The same seed gives the same weights (a few steps of each stage, twice); refining the decoder leaves the
    encoder, and so the latents a base's UNet learned, as they were."""
    from trainer.toy import pretrain as P

    recipe = P.Recipe(vae_steps=2, vae_batch=2, decoder_steps=2, unet_steps=2, unet_batch=2, images=8, vae_images=8)

    def run() -> dict[str, torch.Tensor]:
        base = P.skeleton("sd15")
        P.train_vae(base.vae, recipe, say=lambda _: None)
        trained = {k: v.clone() for k, v in base.vae.state_dict().items()}
        P.refine_decoder(base.vae, recipe, say=lambda _: None)
        refined = base.vae.state_dict()
        assert all(torch.equal(refined[k], v) for k, v in trained.items() if k.startswith(("encoder.", "quant_conv.")))
        assert not torch.equal(refined["decoder.conv_out.weight"], trained["decoder.conv_out.weight"])
        P.train_unet(base, recipe, say=lambda _: None)
        return {**base.vae.state_dict(), **{f"unet.{k}": v for k, v in base.unet.state_dict().items()}}

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = P.skeleton("sd15").unet.state_dict()
    assert not all(torch.equal(a[f"unet.{k}"], v) for k, v in fresh.items())  # it did train
    assert set(TOY_BASES) == {f"toy-{layout}" for layout in P.LAYOUTS}


def test_a_toy_file_loads_with_its_own_config(tmp_path: Path) -> None:
    """The file's metadata picks the toy config (a 4x VAE normalising all channels together, 16x16 latents at
    64 px, word-level tokenizers), through the same single-file loader as any checkpoint; a re-saved toy model
    (a merge) keeps saying it is one."""
    from trainer.infer.pipeline import native_size
    from trainer.models.load import load_base
    from trainer.models.single_file import save_single_file
    from trainer.plan_count import vae_factor
    from trainer.toy import pretrain as P

    base = P.skeleton("sd15")
    toy = save_single_file(base, tmp_path / "toy.safetensors", metadata={"loraforge.config": "toy-sd15"})
    loaded = load_base(toy)
    assert loaded.vae.config.norm_num_groups == 1 and loaded.extra["config"] == "toy-sd15"
    assert vae_factor(loaded.vae) == 4 and native_size(loaded) == 64
    assert torch.equal(loaded.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert loaded.tokenizers[0]("red circle").input_ids == base.tokenizers[0]("red circle").input_ids
    merged = load_base(save_single_file(loaded, tmp_path / "merged.safetensors"))
    assert merged.extra["config"] == "toy-sd15"


def test_toy_tokenizer_has_a_token_per_caption_word() -> None:
    """Like CLIP's vocabulary for common words: every word of a toy caption is one token (a colour word is the
    same token wherever it stands), any other word falls back to byte tokens; the tiny models keep bytes."""
    from trainer.models.tokenizers import build_local_tokenizer, tokenizers_for
    from trainer.toy import pretrain as P
    from trainer.toy.world import CAPTION_WORDS, Scene

    tok = tokenizers_for("sd1", "toy-sd15")[0]
    for w in CAPTION_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok(Scene("girl", "red", "green", "small", "stripes").caption()).input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["small</w>", "chibi</w>", "girl</w>", "in</w>", "red</w>",
                                                    "dress</w>", "on</w>", "green</w>", "with</w>", "stripes</w>"]
    assert tok.convert_ids_to_tokens(tok("zqx", add_special_tokens=False).input_ids) == ["z", "q", "x</w>"]
    assert tok("reds", add_special_tokens=False).input_ids != tok("red", add_special_tokens=False).input_ids
    assert len(tokenizers_for("sd1", "tiny-sd15")[0]) == len(build_local_tokenizer()) == 514
    sdxl = P.skeleton("sdxl")
    assert [te.config.vocab_size for te in sdxl.text_encoders] == [len(tok), len(tok)]


@pytest.mark.parametrize("name", sorted(SHIPPED_MIN))
def test_the_shipped_base_draws_what_it_is_asked_for(name: str) -> None:
    """The shipped file, loaded by its built-in name, draws the figure and colour of the prompt (12 prompts, the
    detectors read the samples). Threshold from docs/toy-world.md's measurement, with margin."""
    from trainer.models.load import load_base
    from trainer.toy.measure import prompt_following

    acc, res = prompt_following(load_base(name), n=12)
    assert acc >= SHIPPED_MIN[name], [(r.scene.caption(), r.reading.colour, r.reading.figure) for r in res]
