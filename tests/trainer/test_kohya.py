"""kohya file format: exact key sets on full-size models (meta device), metadata and hashes, safe reading."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)


from trainer.format.checkpoint import CONFIGS_DIR  # noqa: E402
from trainer.format.kohya import LoraFileError, delta_weight, read_kohya, save_kohya  # noqa: E402
from trainer.format.metadata import build_metadata  # noqa: E402
from trainer.format.names import UNET_PREFIX, unet_key_map  # noqa: E402
from trainer.models.base import meta_model  # noqa: E402
from trainer.models.load import load_base  # noqa: E402
from trainer.network.targets import (  # noqa: E402
    all_module_targets,
    block_of_kohya_name,
    block_slots,
    check_compatible,
    lora_targets,
    parse_blocks,
)

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _meta_models(folder: str):
    """Full-size UNet + text encoders on the meta device: shapes without allocating weights."""
    m = meta_model(CONFIGS_DIR / folder)
    return m.unet, m.text_encoders


@pytest.fixture(scope="module")
def full_sd15():
    return _meta_models("sd15")


@pytest.fixture(scope="module")
def full_sdxl():
    return _meta_models("sdxl")


def _key_shapes(targets, rank=8, conv_rank=4) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for t in targets:
        r = conv_rank if t.uses_conv_dim else rank
        out[t.kohya_name + ".lora_down.weight"] = t.down_shape(r)
        out[t.kohya_name + ".lora_up.weight"] = t.up_shape(r)
        out[t.kohya_name + ".alpha"] = ()
    return out


def _common_key_checks(keys: dict[str, tuple[int, ...]], n_modules: int) -> None:
    assert len(keys) == 3 * n_modules
    assert not any("lora_te_encoder_layers" in k or "lora_te1_encoder_layers" in k or "lora_te2_encoder_layers" in k
                   for k in keys)
    for k in keys:
        assert sum(k.endswith(s) for s in SUFFIXES) == 1
        base = k[: k.index(".")]
        assert base.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))
        assert all(base + s in keys for s in SUFFIXES)


def test_full_sd15_key_set(full_sd15):
    unet, tes = full_sd15
    plain = lora_targets(unet, tes, "sd1", conv=False, train_te=True)
    conv = lora_targets(unet, tes, "sd1", conv=True, train_te=True)
    assert len(plain) == 264 and len(conv) == 350
    assert sum(t.model != "unet" for t in plain) == 72
    ks = _key_shapes(conv, rank=8, conv_rank=4)
    _common_key_checks(ks, 350)
    assert ks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] == (8, 320)
    assert ks["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (8, 768)
    assert ks["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (8, 320, 1, 1)
    assert ks["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (4, 320, 3, 3)
    assert ks["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] == (320, 4, 1, 1)
    assert ks["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] == (8, 768)
    # time_emb_proj (Linear) and conv_shortcut (1x1) take the linear rank
    assert ks["lora_unet_down_blocks_1_resnets_0_time_emb_proj.lora_down.weight"] == (8, 1280)
    assert ks["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"] == (8, 320, 1, 1)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in ks
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight" in ks
    assert not any("conv_in" in k or "conv_out" in k or "time_embedding" in k for k in ks)


def test_full_sdxl_key_set(full_sdxl):
    unet, tes = full_sdxl
    plain = lora_targets(unet, tes, "sdxl", conv=False, train_te=True)
    conv = lora_targets(unet, tes, "sdxl", conv=True, train_te=True)
    assert len(plain) == 986 and len(conv) == 1052
    assert [sum(t.model == m for t in plain) for m in ("te1", "te2", "unet")] == [72, 192, 722]
    ks = _key_shapes(conv, rank=8, conv_rank=4)
    _common_key_checks(ks, 1052)
    assert ks["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] == (8, 640)
    assert ks["lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (8, 2048)
    assert ks["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj.lora_up.weight"] == (10240, 8)
    assert ks["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] == (4, 320, 3, 3)
    assert ks["lora_unet_input_blocks_1_0_out_layers_3.lora_up.weight"] == (320, 4, 1, 1)
    assert ks["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"] == (8, 1280)
    assert ks["lora_unet_input_blocks_4_0_skip_connection.lora_down.weight"] == (8, 320, 1, 1)
    assert ks["lora_unet_input_blocks_3_0_op.lora_down.weight"] == (4, 320, 3, 3)
    assert ks["lora_unet_output_blocks_2_2_conv.lora_down.weight"] == (4, 1280, 3, 3)
    assert ks["lora_unet_output_blocks_5_2_conv.lora_down.weight"] == (4, 640, 3, 3)
    assert ks["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] == (8, 768)
    assert ks["lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_down.weight"] == (8, 5120)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in ks)


def test_block_names_agree_everywhere(full_sd15, full_sdxl):
    for (unet, tes), arch in ((full_sd15, "sd1"), (full_sdxl, "sdxl")):
        slots = set(block_slots(arch))
        for t in lora_targets(unet, tes, arch, conv=True, train_te=True):
            assert t.block in slots
            # the name-only function (for files from any trainer) agrees with the module walk, for every alias too
            assert block_of_kohya_name(t.kohya_name, arch) == t.block, t.kohya_name
            for a in t.aliases:
                assert block_of_kohya_name(a + ".alpha", arch) == t.block, a
    assert len(block_slots("sd1")) == 26 and len(block_slots("sdxl")) == 20
    assert block_of_kohya_name("lora_unet_output_blocks_2_2_conv", "sdxl") == "OUT02"
    assert block_of_kohya_name("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1") == "OUT02"
    assert block_of_kohya_name("lora_unet_down_blocks_1_downsamplers_0_conv", "sd1") == "IN06"


def test_lora_names_and_checkpoint_keys_share_one_sgm_map(full_sd15, full_sdxl):
    """Every Linear/Conv of the full-size UNets: the LoRA side (targets: SDXL kohya names, block slots) and the
    checkpoint side (names.unet_key_map: where merges add the delta) place it at the same SGM module, upsamplers
    included (facts.md s.1: output_blocks.{3i+2}.{2 if the block has attentions else 1}.conv)."""
    for (unet, _), arch in ((full_sd15, "sd1"), (full_sdxl, "sdxl")):
        keys = unet_key_map(unet)
        table = {t.path: t for t in all_module_targets(unet, [], arch).values()}
        # every Linear / 1x1 / 3x3 conv of the UNet, not just the trained ones
        assert len(table) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
        for path, t in table.items():
            sgm = keys[path + ".weight"].key.removeprefix(UNET_PREFIX).removesuffix(".weight")
            sgm_name = "lora_unet_" + sgm.replace(".", "_")
            if arch == "sdxl":
                assert t.kohya_name == sgm_name, path
            assert t.block == block_of_kohya_name(sgm_name, arch), path
        ups = [i for i, b in enumerate(unet.up_blocks) if b.upsamplers]
        assert len(ups) == {"sd1": 3, "sdxl": 2}[arch]
        for i in ups:
            slot = 2 if getattr(unet.up_blocks[i], "attentions", None) else 1
            want = f"output_blocks.{3 * i + 2}.{slot}.conv"
            path = f"up_blocks.{i}.upsamplers.0.conv"
            assert keys[path + ".weight"].key == f"{UNET_PREFIX}{want}.weight"
            assert table[path].block == f"OUT{3 * i + 2:02d}"
            if arch == "sdxl":
                assert table[path].kohya_name == "lora_unet_" + want.replace(".", "_")
    # SD1.5's first up block has no attentions: its upsampler sits in slot 1, not 2
    assert unet_key_map(full_sd15[0])["up_blocks.0.upsamplers.0.conv.weight"].key == \
        UNET_PREFIX + "output_blocks.2.1.conv.weight"


def test_block_selection(full_sd15, full_sdxl):
    unet, tes = full_sd15
    assert parse_blocks("OUT03-OUT05,mid", "sd1") == ["MID", "OUT03", "OUT04", "OUT05"]
    assert parse_blocks("in4, IN05", "sd1") == ["IN04", "IN05"]
    sel = lora_targets(unet, tes, "sd1", conv=True, train_te=True, blocks="OUT03-OUT05")
    assert sel and {t.block for t in sel} == {"OUT03", "OUT04", "OUT05"}
    # OUT03-OUT05 is up_blocks.1 (attentions 0-2 and resnets 0-2), nothing else
    assert all(t.kohya_name.startswith("lora_unet_up_blocks_1_") for t in sel)
    assert "lora_unet_up_blocks_1_upsamplers_0_conv" in {t.kohya_name for t in sel}  # OUT05 holds the upsampler
    assert not any(t.model != "unet" for t in sel)  # BASE (text encoder) was not selected
    with pytest.raises(ValueError) as e:
        parse_blocks("OUT03-OUT12", "sdxl")
    assert "OUT12" in str(e.value) and "valid blocks are BASE, IN00" in str(e.value) and "OUT08" in str(e.value)
    with pytest.raises(ValueError, match="backwards"):
        parse_blocks("OUT05-OUT03", "sd1")
    xu, xt = full_sdxl
    sel = lora_targets(xu, xt, "sdxl", conv=False, train_te=True, blocks=["BASE", "MID"])
    assert {t.block for t in sel} == {"BASE", "MID"}
    assert {t.model for t in sel} == {"te1", "te2", "unet"}


# --- writing and reading tiny files --------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    from trainer.network.lora import LoraNetwork

    base = load_base("tiny-sd15")
    net = LoraNetwork.create(base, 8, 4, conv_dim=4, conv_alpha=2, train_text_encoder=True, seed=1)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.normal_(0, 0.05)
    md = build_metadata("sd1", 8, 4, 4, 2, base_model_name="tiny-sd15", output_name="mychar", resolution=512,
                        training={"learning_rate": 1e-4, "ss_seed": 42, "max_train_steps": 10})
    path = tmp_path_factory.mktemp("lora") / "mychar.safetensors"
    h = net.save(path, md, dtype=torch.float16)
    state = net.network_state()
    net.remove()
    return path, h, state, base


def test_file_layout_metadata_and_hash(sd15_file):
    path, h, state, _ = sd15_file
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    md = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in md.values())
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() == h
    assert len(md["sshs_legacy_hash"]) == 8
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert md["ss_output_name"] == "mychar" and md["ss_sd_model_name"] == "tiny-sd15"
    assert md["ss_learning_rate"] == "0.0001" and md["ss_seed"] == "42" and md["ss_resolution"] == "(512, 512)"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.resolution"] == "512x512" and md["modelspec.title"] == "mychar"
    assert set(header) == set(state)
    tensors = load_file(path)
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            assert v.dim() == 0
            # the trained alpha of that module: 2 for 3x3 convs (conv_alpha), 4 elsewhere
            name = k[: -len(".alpha")]
            is3 = tensors[name + ".lora_down.weight"].shape[-1:] == (3,)
            assert float(v) == (2.0 if is3 else 4.0)
        else:
            assert v.dtype == torch.float16
            assert torch.allclose(v.float(), state[k], atol=1e-3)
    assert not list(path.parent.glob("*.tmp"))  # atomic write left nothing behind


def test_other_metadata_archs():
    xl = build_metadata("sdxl", 16, 8, base_model_name="sdxl.safetensors", output_name="x", resolution=(1024, 1024))
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["ss_network_args"] == "{}"
    v2 = build_metadata("sd2", 8, 1, base_model_name="sd2", output_name="x", resolution=768)
    assert v2["ss_v2"] == "True" and v2["ss_base_model_version"] == "sd_v2"
    assert v2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_read_back_and_check(sd15_file):
    path, _, state, base = sd15_file
    lora = read_kohya(path)
    assert lora.arch == "sd1"
    assert len(lora.modules) == len(state) // 3
    mapping = check_compatible(lora, base)
    assert set(mapping) == set(lora.modules)
    m = next(m for m in lora.modules.values() if m.kind == "conv3x3")
    assert m.alpha == 2.0 and m.rank == 4
    d = delta_weight(m.down, m.up, m.alpha, m.kind)
    assert d.shape == (m.up.shape[0], m.down.shape[1], 3, 3)
    ref = (m.up.float().flatten(1) @ m.down.float().flatten(1)) * 0.5
    assert torch.allclose(d.flatten(1), ref)


def test_missing_alpha_means_rank(tmp_path):
    p = tmp_path / "noalpha.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4)}, str(p))
    m = read_kohya(p).modules["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert m.alpha == 4.0 and m.scale == 1.0


def _tampered(path: Path, tmp_path: Path, edit) -> Path:
    t = load_file(path)
    edit(t)
    out = tmp_path / "bad.safetensors"
    save_file(t, str(out))
    return out


def test_bad_files(sd15_file, tmp_path):
    path, _, _, base = sd15_file
    some = next(k[: -len(".alpha")] for k in load_file(path) if k.endswith(".alpha"))

    with pytest.raises(LoraFileError, match="not kohya LoRA parts.*remove those tensors"):
        read_kohya(_tampered(path, tmp_path, lambda t: t.__setitem__("lora_unet_foo.bias", torch.zeros(3))))
    with pytest.raises(LoraFileError, match="not kohya LoRA parts"):
        read_kohya(_tampered(path, tmp_path, lambda t: t.__setitem__("something_else", torch.zeros(3))))

    def bad_rank(t):
        t[some + ".lora_up.weight"] = torch.zeros(t[some + ".lora_up.weight"].shape[0], 3, *t[
            some + ".lora_up.weight"].shape[2:], dtype=torch.float16)
    with pytest.raises(LoraFileError, match="mismatched ranks"):
        read_kohya(_tampered(path, tmp_path, bad_rank))

    def nan(t):
        t[some + ".lora_down.weight"][0].fill_(float("nan"))
    with pytest.raises(LoraFileError, match="NaN"):
        read_kohya(_tampered(path, tmp_path, nan))

    def drop_up(t):
        del t[some + ".lora_up.weight"]
    with pytest.raises(LoraFileError, match="no lora_up.weight"):
        read_kohya(_tampered(path, tmp_path, drop_up))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match="truncated"):
        read_kohya(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        read_kohya(tiny)

    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(ckpt))
    with pytest.raises(LoraFileError, match="checkpoint.*not a LoRA"):
        read_kohya(ckpt)
    peft_style = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, str(peft_style))
    with pytest.raises(LoraFileError, match="diffusers/PEFT-format"):
        read_kohya(peft_style)
    ints = tmp_path / "ints.safetensors"
    save_file({f"{some}.lora_down.weight": torch.zeros(2, 32, dtype=torch.int32),
               f"{some}.lora_up.weight": torch.zeros(32, 2, dtype=torch.int32)}, str(ints))
    with pytest.raises(LoraFileError, match="dtype I32"):
        read_kohya(ints)


def test_sdxl_lora_on_sd1_base(sd15_file, tmp_path):
    _, _, _, base = sd15_file
    p = tmp_path / "xl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}, str(p))
    lora = read_kohya(p)
    assert lora.arch == "sdxl"
    with pytest.raises(LoraFileError, match="is an SDXL LoRA but the base is SD1.x"):
        check_compatible(lora, base)


def test_wrong_shape_for_base(sd15_file, tmp_path):
    _, _, _, base = sd15_file
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = read_kohya({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4)})
    with pytest.raises(LoraFileError, match="different model"):
        check_compatible(lora, base)
    lora = read_kohya({"lora_unet_nowhere_at_all.lora_down.weight": torch.zeros(4, 32),
                       "lora_unet_nowhere_at_all.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraFileError, match="no matching layer"):
        check_compatible(lora, base)


def test_save_rejects_foreign_keys(tmp_path):
    with pytest.raises(ValueError):
        save_kohya(tmp_path / "x.safetensors", {"unet.foo.lora_A.weight": torch.zeros(2, 2)}, {})
    assert not list(tmp_path.iterdir())
