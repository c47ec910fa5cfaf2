"""Single-file (A1111) checkpoints: safe reading, architecture detection, loading offline, and the way back."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import struct
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

from trainer.format.checkpoint import CONFIGS_DIR  # noqa: E402
from trainer.format.names import (  # noqa: E402
    UNET_PREFIX,
    checkpoint_key_map,
    diffusers_to_original_unet_key,
    to_original_state_dict,
)
from trainer.models import single_file as ck  # noqa: E402
from trainer.models import tokenizers as tk  # noqa: E402
from trainer.models.base import BaseModel, meta_model  # noqa: E402
from trainer.models.builtin import TINY_MODELS  # noqa: E402
from trainer.models.load import load_base  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return m.state_dict()


def _assert_same_model(a: BaseModel, b: BaseModel) -> None:
    pairs = [(a.unet, b.unet), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders, strict=True)]
    for x, y in pairs:
        sx, sy = _state(x), _state(y)
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]), k


def _unet_out(model: BaseModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = model.unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    kw = {}
    if model.arch == "sdxl":
        pooled = model.text_encoders[1].config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), ctx, **kw).sample


# --- loading the tiny models from single files ---------------------------------------------------

@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_single_file_loads_offline_and_matches_folder(name: str, cache, no_network) -> None:
    path = ck.materialize_tiny_single_file(name)
    assert path.suffix == ".safetensors" and ck.materialize_tiny_single_file(name) == path  # cached
    single = load_base(path)
    folder = load_base(name)
    assert single.arch == folder.arch == {"tiny-sd15": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[name]
    assert single.name == path.stem and single.source == path
    assert single.prediction_type == folder.prediction_type
    assert len(single.tokenizers) == len(single.text_encoders)
    _assert_same_model(single, folder)  # diffusers -> original -> diffusers is exact
    # weights are equal bit for bit; outputs may differ in the last bit because BLAS kernels take other paths
    # for differently aligned (mmap'd) weight buffers
    torch.testing.assert_close(_unet_out(single), _unet_out(folder), rtol=1e-5, atol=1e-5)
    ids = single.tokenizers[0]("a photo", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        single.text_encoders[0](ids)


def test_save_of_a_loaded_file_reproduces_it(cache, tmp_path: Path) -> None:
    src = ck.materialize_tiny_single_file("tiny-sdxl")
    model = load_base(src)
    out = ck.save_single_file(model, tmp_path / "again.safetensors", metadata={"modelspec.title": "again"})
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, md = ck.read_safetensors_header(out)
    assert md["modelspec.title"] == "again"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_original_layout_names(cache) -> None:
    sd = load_file(str(ck.materialize_tiny_single_file("tiny-sdxl")))
    for key in ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.2.conv.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",  # 16 -> 8 channels
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.quant_conv.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.1.model.positional_embedding"]:
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # conv 1x1 in the original
    assert sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (48, 40)  # transposed Linear
    assert not any(".down_blocks." in k or ".resnets." in k for k in sd)


def test_key_map_slices_for_merges(cache) -> None:
    model = load_base("tiny-sdxl")
    km = checkpoint_key_map(model)
    sd = to_original_state_dict(model)
    ok = km["text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.weight"]
    assert ok.key == "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert ok.rows == (48, 96)
    assert torch.equal(sd[ok.key][ok.rows[0]:ok.rows[1]],
                       model.text_encoders[1].text_model.encoder.layers[1].self_attn.k_proj.weight)
    # transformers 5 flattened CLIPTextModel: names without text_model. still map under text_model.
    te1 = km["text_encoder.encoder.layers.0.mlp.fc1.weight"]
    assert te1.key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert km["unet.up_blocks.0.upsamplers.0.conv.weight"].key == UNET_PREFIX + "output_blocks.2.2.conv.weight"


def test_unet_names_match_kohya_sdxl_examples() -> None:
    f = diffusers_to_original_unet_key
    assert f("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", prefix="") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert f("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", prefix="") == \
        "output_blocks.0.1.transformer_blocks.0.attn2.to_k"
    assert f("mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj", prefix="") == \
        "middle_block.1.transformer_blocks.9.ff.net.0.proj"
    assert f("down_blocks.0.resnets.0.conv1", prefix="") == "input_blocks.1.0.in_layers.2"
    assert f("down_blocks.0.resnets.0.conv2.weight") == UNET_PREFIX + "input_blocks.1.0.out_layers.3.weight"
    assert f("down_blocks.0.resnets.1.time_emb_proj", prefix="") == "input_blocks.2.0.emb_layers.1"
    assert f("down_blocks.1.resnets.0.conv_shortcut", prefix="") == "input_blocks.4.0.skip_connection"
    assert f("down_blocks.0.downsamplers.0.conv", prefix="") == "input_blocks.3.0.op"
    assert f("up_blocks.0.upsamplers.0.conv", up_block_has_attention=[True, True, False], prefix="") == \
        "output_blocks.2.2.conv"
    # SD1.5: up_blocks.0 has no attention, so its upsampler sits in slot 1
    assert f("up_blocks.0.upsamplers.0.conv", up_block_has_attention=[False, True, True, True], prefix="") == \
        "output_blocks.2.1.conv"
    assert f("mid_block.resnets.1.norm2.bias", prefix="") == "middle_block.2.out_layers.0.bias"


# --- full-size layouts, checked on meta tensors (no memory, no weights) ---------------------------

def _meta_model(config: str) -> BaseModel:
    return meta_model(CONFIGS_DIR / config)


@pytest.mark.parametrize("config,arch,n_unet", [("sd15", "sd1", 686), ("sd2", "sd2", 686), ("sdxl", "sdxl", 1680)])
def test_full_size_layouts_are_detected_and_matched(config: str, arch: str, n_unet: int) -> None:
    sd = to_original_state_dict(_meta_model(config))
    header = {k: {"dtype": "F16", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in sd.items()}
    assert sum(k.startswith(UNET_PREFIX) for k in header) == n_unet  # the real files' UNet key counts
    assert sum(k.startswith("first_stage_model.") for k in header) == 248
    assert ck.detect_arch(list(header)) == arch
    assert ck.select_config(arch, header) == CONFIGS_DIR / config
    widths = ck._widths(header)
    assert widths["model_channels"] == 320 and widths["context_dim"] == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[arch]


def test_inpainting_and_unknown_widths_are_refused(cache) -> None:
    header = {k: {"shape": list(v.shape)} for k, v in load_file(str(ck.materialize_tiny_single_file("tiny-sd15"))).items()}
    header[UNET_PREFIX + "input_blocks.0.0.weight"]["shape"][1] = 9
    with pytest.raises(ck.CheckpointError, match="inpainting"):
        ck.select_config("sd1", header)
    header[UNET_PREFIX + "input_blocks.0.0.weight"]["shape"][1] = 4
    header[UNET_PREFIX + "out.2.weight"]["shape"][1] = 7
    with pytest.raises(ck.CheckpointError, match="does not match"):
        ck.select_config("sd1", header)


# --- refusing what is not a safe SD checkpoint --------------------------------------------------

def test_arch_from_keys() -> None:
    u = [UNET_PREFIX + "input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]
    assert ck.detect_arch(u + ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert ck.detect_arch(u + ["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert ck.detect_arch(u + [UNET_PREFIX + "label_emb.0.0.weight", "conditioner.embedders.1.model.ln_final.weight",
                               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]) == "sdxl"
    with pytest.raises(ck.CheckpointError, match="looks like a VAE"):
        ck.detect_arch(["encoder.conv_in.weight", "decoder.conv_out.weight"])
    with pytest.raises(ck.CheckpointError, match="no VAE"):
        ck.detect_arch(u[:1] + ["cond_stage_model.model.ln_final.weight"])


@pytest.mark.parametrize("fname", ["model.ckpt", "model.safetensors", "model.bin"])
def test_pickles_are_refused_unread(fname: str, tmp_path: Path, no_unpickling) -> None:
    p = tmp_path / fname
    p.write_bytes(pickle.dumps({"state_dict": {"a": 1}}))
    with pytest.raises(ck.CheckpointError) as e:
        load_base(p)
    msg = str(e.value)
    assert "pickle" in msg and "safetensors" in msg and "run" in msg


def test_torch_save_zip_is_refused(tmp_path: Path, no_unpickling) -> None:
    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 64)  # how every torch.save file starts
    with pytest.raises(ck.CheckpointError, match="pickle"):
        ck.load_single_file(p)


def test_truncated_and_garbage_files_are_refused(cache, tmp_path: Path) -> None:
    data = ck.materialize_tiny_single_file("tiny-sd15").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="not a valid .safetensors file.*truncated"):
        ck.load_single_file(cut)
    for name, blob in [("short", b"abc"), ("huge", struct.pack("<Q", 2**40) + b"{}"),
                       ("nojson", struct.pack("<Q", 4) + b"nope")]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(ck.CheckpointError, match="not a valid .safetensors file"):
            ck.load_single_file(p)


def test_lora_passed_as_checkpoint_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "style.safetensors"
    n = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{n}.lora_down.weight": torch.zeros(4, 32), f"{n}.lora_up.weight": torch.zeros(32, 4),
               f"{n}.alpha": torch.tensor(4.0)}, str(p))
    with pytest.raises(ck.CheckpointError, match="not a Stable Diffusion checkpoint.*LoRA"):
        load_base(p)


# --- options ------------------------------------------------------------------------------------

def test_half_writes_fp16(cache, tmp_path: Path) -> None:
    model = load_base("tiny-sd15")
    out = ck.save_single_file(model, tmp_path / "half.safetensors", half=True)
    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    back = ck.load_single_file(out, dtype=torch.float16)
    assert back.unet.dtype == torch.float16
    torch.testing.assert_close(back.unet.conv_in.weight, model.unet.conv_in.weight.half(), rtol=0, atol=0)
    with pytest.raises(ck.CheckpointError, match=".safetensors only"):
        ck.save_single_file(model, tmp_path / "x.ckpt")


def test_prediction_type_override_and_sdxl_v_marker(cache, tmp_path: Path) -> None:
    src = ck.materialize_tiny_single_file("tiny-sdxl")
    m = ck.load_single_file(src, prediction_type="v_prediction")
    assert (m.prediction_type, m.extra["prediction_type_source"]) == ("v_prediction", "argument")
    out = ck.save_single_file(m, tmp_path / "vpred.safetensors")
    tensors, md = ck.read_safetensors_header(out)
    assert "v_pred" in tensors and md["modelspec.prediction_type"] == "v"
    assert ck.load_single_file(out).prediction_type == "v_prediction"
    with pytest.raises(ck.CheckpointError, match="prediction_type"):
        ck.load_single_file(src, prediction_type="sample")


# --- tokenizers ---------------------------------------------------------------------------------

def test_clip_tokenizer_from_bpe_file(tmp_path: Path) -> None:
    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nh e\nhe l\nhel l\nhell o</w>\n")
    tok = tk.build_clip_tokenizer(bpe_path=bpe)
    assert len(tok) == 512 + 4 + 2
    hello = tok.convert_tokens_to_ids("hello</w>")
    assert hello == 512 + 3
    assert tok("hello").input_ids == [516, hello, 517]  # <|startoftext|> hello <|endoftext|>


def test_clip_tokenizer_fallback_keeps_real_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "find_clip_bpe", lambda: None)
    tok = tk.build_clip_tokenizer(pad_token="!")
    assert len(tok) == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 0
    assert tok("a").input_ids == [49406, tok.convert_tokens_to_ids("a</w>"), 49407]
    assert tok.convert_tokens_to_ids("a</w>") == 256 + 64  # CLIP's real id for "a</w>"


def test_diffusers_folder_with_pickle_weights_is_refused_unread(tmp_path: Path) -> None:
    """A diffusers folder holding only .bin (pickle) weights is refused without torch.load ever running."""
    import shutil

    from trainer.models.base import ModelError, load_diffusers_folder
    from trainer.models.builtin import tiny_model_dir

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir("tiny-sd15"), folder)
    unet = folder / "unet"
    for f in unet.glob("*.safetensors"):
        f.unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ModelError, match=r"pickle.*diffusion_pytorch_model\.bin|diffusion_pytorch_model\.bin.*pickle"):
        load_diffusers_folder(folder)
