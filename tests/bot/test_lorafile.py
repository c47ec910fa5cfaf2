"""bot/lorafile.py: torch-free safetensors header checks of uploaded LoRAs (files built by hand here),
plus one cross-check that the engine's reader refuses the same bad files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from bot.lorafile import (
    LoraCheckError,
    base_model_arch,
    check_same_arch,
    check_shapes_match,
    inspect_bytes,
    inspect_file,
    tag_prompt,
)
from trainer.format.checkpoint import checkpoint_arch as keys_arch

SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8}
SD1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
XL_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def st_bytes(tensors: dict[str, tuple[str, list[int]]], meta: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file: header + zeroed data, tensors laid out in order."""
    header: dict[str, object] = {}
    off = 0
    for k, (dtype, shape) in tensors.items():
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * off


def lora(rank: int = 4, *, width: int = 32, conv_rank: int = 0, names: tuple[str, ...] = (SD1_Q,),
         dtype: str = "F16", alpha: bool = True) -> dict[str, tuple[str, list[int]]]:
    t: dict[str, tuple[str, list[int]]] = {}
    for n in names:
        t[f"{n}.lora_down.weight"] = (dtype, [rank, width])
        t[f"{n}.lora_up.weight"] = (dtype, [width * 2, rank])
        if alpha:
            t[f"{n}.alpha"] = (dtype, [])
    if conv_rank:
        t[f"{SD1_CONV}.lora_down.weight"] = (dtype, [conv_rank, 16, 3, 3])
        t[f"{SD1_CONV}.lora_up.weight"] = (dtype, [24, conv_rank, 1, 1])
        t[f"{SD1_CONV}.alpha"] = (dtype, [])
    return t


def refused(data: bytes, name: str = "x.safetensors") -> str:
    with pytest.raises(LoraCheckError) as e:
        inspect_bytes(data, name)
    msg = str(e.value)
    assert name in msg  # every refusal names the file
    return msg


def test_valid_lora_ranks_arch_and_metadata():
    info = inspect_bytes(st_bytes(lora(4, conv_rank=2), {"ss_base_model_version": "sd_v1"}), "front.safetensors")
    assert info.arch == "sd1" and info.rank == 4 and info.conv_rank == 2
    assert info.modules[SD1_CONV][0] == "conv3x3" and info.modules[SD1_Q][0] == "linear"
    assert info.metadata["ss_base_model_version"] == "sd_v1"
    # no alpha is fine (alpha = rank), no metadata is fine (arch unknown)
    assert inspect_bytes(st_bytes(lora(alpha=False)), "a.safetensors").arch is None


@pytest.mark.parametrize(("names", "width", "arch"), [
    ((XL_Q,), 32, "sdxl"),  # SGM block names are SDXL's
    (("lora_te2_text_model_encoder_layers_0_self_attn_q_proj",), 32, "sdxl"),
    ((SD1_K2,), 768, "sd1"),  # cross-attention width
    ((SD1_K2,), 1024, "sd2"),
    (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",), 768, "sd1"),  # diffusers' SD1 TE naming
])
def test_arch_from_names_and_widths(names, width, arch):
    assert inspect_bytes(st_bytes(lora(names=names, width=width)), "a.safetensors").arch == arch


def test_not_safetensors_pickle_truncated_garbage():
    assert "not a .safetensors file" in refused(b"whatever", "lora.ckpt")
    legacy = b"\x80\x02}q\x00(X\x05\x00\x00\x00state" + b"\0" * 64
    assert "pickle" in refused(legacy)
    zipped = b"PK\x03\x04" + b"\0" * 200  # torch.save's zip container
    assert "pickle" in refused(zipped)
    good = st_bytes(lora(8))
    assert "truncated" in refused(good[: len(good) - 10])
    assert "truncated" in refused(good[:20])
    assert "not a safetensors file" in refused(b"abc")
    assert "damaged" in refused(struct.pack("<Q", 5) + b"{oops")
    assert "unexpected bytes" in refused(good + b"extra")


def test_not_a_lora():
    ckpt = st_bytes({"model.diffusion_model.input_blocks.0.0.weight": ("F16", [4, 4, 3, 3]),
                     "cond_stage_model.transformer.text_model.embeddings.position_ids": ("F32", [1, 77])})
    assert "checkpoint" in refused(ckpt, "model.safetensors")
    vae = st_bytes({"encoder.conv_in.weight": ("F32", [8, 3, 3, 3]), "decoder.conv_in.weight": ("F32", [8, 4, 3, 3])})
    assert "VAE" in refused(vae)
    peft = st_bytes({"unet.down_blocks.0.attn1.to_q.lora_A.weight": ("F32", [4, 32])})
    assert "PEFT" in refused(peft)
    loha = st_bytes({"lora_unet_x.hada_w1_a": ("F32", [4, 4])})
    assert "LoHa" in refused(loha)
    assert "not a kohya LoRA" in refused(st_bytes({"weird.tensor": ("F32", [2])}))
    assert "no tensors" in refused(st_bytes({}))


def test_layout_problems():
    t = lora(4)
    t[f"{SD1_Q}.lora_up.weight"] = ("F16", [64, 3])
    assert "mismatched" in refused(st_bytes(t))
    t = lora(4)
    del t[f"{SD1_Q}.lora_up.weight"]
    assert "no lora_up.weight" in refused(st_bytes(t))
    t = lora(4)
    t[f"{SD1_Q}.alpha"] = ("F16", [4])
    assert "single number" in refused(st_bytes(t))
    assert "dtype I64" in refused(st_bytes(lora(dtype="I64")))
    t = lora(4)
    t[f"{SD1_Q}.lora_down.weight"] = ("F16", [4, 32, 5, 5])
    t[f"{SD1_Q}.lora_up.weight"] = ("F16", [64, 4, 1, 1])
    assert "do not form" in refused(st_bytes(t))
    # byte size that disagrees with dtype x shape
    data = bytearray(st_bytes(lora(2)))
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[f"{SD1_Q}.alpha"]["shape"] = [2]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    assert "byte size" in refused(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]))


def test_same_arch_and_matching_shapes():
    sd1 = inspect_bytes(st_bytes(lora(), {"ss_base_model_version": "sd_v1"}), "front.safetensors")
    xl = inspect_bytes(st_bytes(lora(names=(XL_Q,))), "side.safetensors")
    unknown = inspect_bytes(st_bytes(lora(2)), "any.safetensors")
    assert check_same_arch([sd1, unknown]) == "sd1"
    assert check_same_arch([unknown]) is None and check_same_arch([unknown], "sdxl", "b") == "sdxl"
    with pytest.raises(LoraCheckError, match="different base models") as e:
        check_same_arch([sd1, xl])
    assert "front.safetensors" in str(e.value) and "SDXL" in str(e.value)
    with pytest.raises(LoraCheckError, match="is a LoRA for SDXL.*tiny-sd15.*SD1.x"):
        check_same_arch([xl], "sd1", "tiny-sd15")
    other_rank = inspect_bytes(st_bytes(lora(8)), "r8.safetensors")
    check_shapes_match([sd1, other_rank])  # ranks may differ
    wide = inspect_bytes(st_bytes(lora(4, width=40)), "wide.safetensors")
    with pytest.raises(LoraCheckError, match="wide.safetensors.*cannot be merged"):
        check_shapes_match([sd1, wide])


def test_inspect_file_reads_only_the_header(tmp_path: Path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(st_bytes({**lora(4), f"{SD1_K2}.lora_down.weight": ("F32", [4, 768]),
                            f"{SD1_K2}.lora_up.weight": ("F32", [320, 4])}))
    info = inspect_file(p)
    assert info.arch == "sd1" and info.size == p.stat().st_size
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(LoraCheckError, match="truncated"):
        inspect_file(p)
    with pytest.raises(LoraCheckError, match="could not be read"):
        inspect_file(tmp_path / "missing.safetensors")


def test_base_model_arch(tmp_path: Path):
    assert base_model_arch("tiny-sd15", tmp_path) == "sd1" and base_model_arch("tiny-sdxl", tmp_path) == "sdxl"
    (tmp_path / "xl.safetensors").write_bytes(st_bytes({
        "model.diffusion_model.label_emb.0.0.weight": ("F16", [2, 2]),
        "conditioner.embedders.1.model.ln_final.weight": ("F16", [2])}))
    (tmp_path / "v2.safetensors").write_bytes(st_bytes({"cond_stage_model.model.ln_final.weight": ("F16", [2])}))
    assert base_model_arch("xl.safetensors", tmp_path) == "sdxl"
    assert base_model_arch("v2.safetensors", tmp_path) == "sd2"
    folder = tmp_path / "Stable-diffusion" / "my-sd15"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    assert base_model_arch("Stable-diffusion/my-sd15", tmp_path) == "sd1"
    assert base_model_arch("../../etc/passwd", tmp_path) is None
    assert base_model_arch("nope", tmp_path) is None
    assert keys_arch(["cond_stage_model.transformer.text_model.x"]) == "sd1"


def test_tag_prompt():
    assert tag_prompt({"modelspec.trigger_phrase": "scs girl", "ss_output_name": "x"}) == "scs girl"
    freq = json.dumps({"10_scs": {"scs": 12, "chibi": 30}, "5_reg": {"girl": 3}})
    assert tag_prompt({"ss_tag_frequency": freq, "ss_output_name": "x"}) == "chibi"
    assert tag_prompt({"ss_tag_frequency": "not json", "ss_output_name": "front-view"}) == "front-view"
    assert tag_prompt({}) == ""


def test_bot_side_stays_torch_free():
    import subprocess

    code = ("import sys, bot.lorafile, bot.autogrid, cogs.merge, cogs.preview; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("case", ["pickle", "truncated", "checkpoint", "mismatched", "foreign"])
def test_engine_refuses_the_same_files(case: str):
    """Parity: what the bot refuses up front, the worker (trainer.format.kohya) refuses too."""
    pytest.importorskip("torch")
    from trainer.format.kohya import LoraFileError, read_kohya_bytes

    good = st_bytes(lora(4))
    t = lora(4)
    t[f"{SD1_Q}.lora_up.weight"] = ("F16", [64, 3])
    data = {
        "pickle": b"\x80\x02}q\x00" + b"\0" * 64,
        "truncated": good[:-10],
        "checkpoint": st_bytes({"model.diffusion_model.input_blocks.0.0.weight": ("F16", [4, 4, 3, 3])}),
        "mismatched": st_bytes(t),
        "foreign": st_bytes({"weird.tensor": ("F32", [2])}),
    }[case]
    with pytest.raises(LoraCheckError):
        inspect_bytes(data, "x.safetensors")
    with pytest.raises(LoraFileError):
        read_kohya_bytes(data)
    read_kohya_bytes(good)  # and both accept a good one
