"""LoHa, LoKr and DoRA networks: files that ComfyUI and AUTOMATIC1111 load as they are, applied the way they apply
them, trained until the loss falls, converted to LoRA for SVD merges.

The loader rules below are written from ComfyUI (`comfy/lora.py` key maps, `comfy/weight_adapter/{lora,loha,lokr,
base}.py`) and A1111 (`extensions-builtin/Lora/network_{hada,lokr,lora}.py`, `network.py`), independently of the
engine's own code: a key map from the checkpoint's key names and the CLIP layer template, the sets of tensor parts
each adapter consumes, and ComfyUI's weight formulas.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from trainer.format.kohya import LoraFileError, read_kohya  # noqa: E402
from trainer.format.names import checkpoint_key_map  # noqa: E402
from trainer.models.load import load_base  # noqa: E402
from trainer.network.lycoris_net import LycorisNetwork, LycorisStateError  # noqa: E402
from trainer.network.patch import WeightPatcher  # noqa: E402
from trainer.network.svd_merge import MergeError, svd_merge  # noqa: E402
from trainer.network.targets import target_layer  # noqa: E402

torch.set_num_threads(1)

# --- the loaders' rules, from their sources ------------------------------------------------------------------

# ComfyUI's adapters: the tensor parts each one loads for a module (any other part is "lora key not loaded").
COMFY_PART_SETS = [
    {"lora_up.weight", "lora_down.weight"},
    {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    *({w1, *w2} for w1 in ("lokr_w1", "lokr_w1_a|lokr_w1_b") for w2 in (
        {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})),
]
COMFY_PART_SETS = [{p for x in s for p in x.split("|")} for s in COMFY_PART_SETS]
COMFY_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "self_attn.out_proj")


def comfy_key_map(base: Any) -> dict[str, tuple[int, ...]]:
    """LoRA module name -> weight shape, as ComfyUI's model_lora_keys_unet / model_lora_keys_clip build it:
    `lora_unet_` + the checkpoint's UNet key (SGM names, dots to underscores), `lora_unet_` + the diffusers name,
    and the CLIP template `lora_te[1|2]_text_model_encoder_layers_{i}_{layer}`."""
    out: dict[str, tuple[int, ...]] = {}
    kmap = checkpoint_key_map(base)
    for name, mod in base.unet.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) or w is None:
            continue
        out["lora_unet_" + name.replace(".", "_")] = tuple(w.shape)
        ok = kmap.get(f"unet.{name}.weight")
        if ok is not None:
            key = ok.key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            out["lora_unet_" + key.replace(".", "_")] = tuple(w.shape)
    prefixes = ["lora_te1_", "lora_te2_"] if base.arch == "sdxl" else ["lora_te_"]
    for prefix, te in zip(prefixes, base.text_encoders, strict=True):
        layers = te.get_submodule("text_model.encoder.layers" if hasattr(te, "text_model") else "encoder.layers")
        for i, layer in enumerate(layers):
            for c in COMFY_CLIP_LAYERS:
                out[f"{prefix}text_model_encoder_layers_{i}_{c.replace('.', '_')}"] = tuple(
                    layer.get_submodule(c).weight.shape)
    return out


def comfy_weight(parts: dict[str, torch.Tensor], weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI's calculate_weight for lora / loha / lokr (+ weight_decompose for dora_scale), float32."""
    weight = weight.float().clone()
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    p = {k: v.float() for k, v in parts.items()}
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in p:
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim = p["lokr_w1_b"].shape[0]
            w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim = p["lokr_w2_b"].shape[0]
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    diff = diff.reshape(weight.shape)
    dora = p.get("dora_scale")
    if dora is None:
        return weight + strength * scale * diff
    calc = weight + scale * diff
    if dora.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora / (norm + torch.finfo(torch.float32).eps))
    return weight + strength * (calc - weight)


def file_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, _, part = k.partition(".")
        mods.setdefault(name, {})[part] = v
    return mods


# --- networks on the tiny models --------------------------------------------------------------------------

CASES = [  # (algo, model, conv_dim, text encoder)
    pytest.param("loha", "tiny-sd15", 2, True, id="loha-sd15"),
    pytest.param("lokr", "tiny-sdxl", 2, True, id="lokr-sdxl"),
    pytest.param("dora", "tiny-sd15", 2, False, id="dora-sd15"),
    pytest.param("loha", "tiny-sdxl", 0, False, id="loha-sdxl"),
]


def _random_network(base: Any, algo: str, conv_dim: int, te: bool) -> LycorisNetwork:
    net = LycorisNetwork.create(base, algo, 4, 2.0, conv_dim=conv_dim, conv_alpha=1.0, train_text_encoder=te, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking network: every factor non-zero (zero-initialised ones too)
        for p in net.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.abs().mean() + 0.5))
    return net


@pytest.mark.parametrize(("algo", "model", "conv_dim", "te"), CASES)
def test_file_loads_by_comfyui_and_a1111_rules(tmp_path: Path, algo: str, model: str, conv_dim: int,
                                               te: bool) -> None:
    base = load_base(model)
    net = _random_network(base, algo, conv_dim, te)
    path = tmp_path / f"{algo}.safetensors"
    net.save(path, {"ss_network_module": "lycoris.kohya"}, torch.float32)
    mods = file_modules(path)
    keymap = comfy_key_map(base)
    assert len(mods) == len(net.mods) and any(n.startswith("lora_te") for n in mods) == te
    kinds = set()
    for name, parts in mods.items():
        assert name in keymap, f"{name}: no model weight of that name in ComfyUI's key map"
        shape = keymap[name]
        assert "alpha" in parts and parts["alpha"].dim() == 0  # always written: ComfyUI's default scale differs
        weights = set(parts) - {"alpha", "dora_scale"}
        assert weights in COMFY_PART_SETS, f"{name}: parts {sorted(parts)} are not one ComfyUI adapter's"
        assert ("dora_scale" in parts) == (algo == "dora")
        if algo == "dora":  # A1111 reads only the per-input-column form: [1, in] or [1, in, 1, 1]
            assert list(parts["dora_scale"].shape) == [1, shape[1], *([1, 1] if len(shape) == 4 else [])]
        new = comfy_weight(parts, torch.zeros(shape) + 0.1)  # raises when the change does not reshape to it
        assert new.shape == shape
        kinds.add(len(shape) == 4 and shape[-1] == 3)
    assert kinds == ({True, False} if conv_dim else {False})  # 3x3 convs are in the file exactly when asked


@pytest.mark.parametrize(("algo", "model", "conv_dim", "te"), CASES[:3])
def test_round_trip_live_network_file_and_comfyui_formula(tmp_path: Path, algo: str, model: str, conv_dim: int,
                                                          te: bool) -> None:
    """The trained network's forward, our reader + patcher, and ComfyUI's formula on the file all agree."""
    base = load_base(model)
    net = _random_network(base, algo, conv_dim, te)
    path = tmp_path / "net.safetensors"
    net.save(path, {}, torch.float32)
    layers = {n: target_layer(base, t) for n, (t, _) in net.mods.items()}
    x_of = {n: torch.randn(2, *((m.in_features,) if isinstance(m, torch.nn.Linear) else (m.in_channels, 6, 6)))
            for n, m in layers.items()}
    live = {n: layers[n](x_of[n]) for n in layers}  # the LyCORIS modules' own forward
    orig = {n: layers[n].weight.detach().clone() for n in layers}
    net.remove()
    mods = file_modules(path)
    patcher = WeightPatcher(base)
    patcher.apply([(read_kohya(path), 0.7)])
    for n, layer in layers.items():
        expect = comfy_weight(mods[n], orig[n], 0.7)
        assert torch.allclose(layer.weight, expect, atol=1e-5, rtol=1e-4), n
    patcher.restore()
    patcher.apply([(read_kohya(path), 1.0)])
    for n, layer in layers.items():
        assert torch.allclose(layer(x_of[n]), live[n], atol=1e-4, rtol=1e-3), n
    patcher.restore()
    assert all(torch.equal(layers[n].weight, orig[n]) for n in layers)


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_training_lowers_denoising_loss(tmp_path: Path, module_dataset: Path, make_spec, algo: str) -> None:
    """Trained through the engine's loop; the loss measured on the saved file as a loader applies it."""
    from trainer.data.dataset import TrainData
    from trainer.train.loop import train
    from trainer.train.losses import eval_denoise_loss

    spec = make_spec(module_dataset, base_model="tiny-sd15", steps=30, network={"type": algo})
    out = train(spec, tmp_path / "job")
    with safe_open(out["lora"], framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == ("lora" if algo == "dora" else algo)
    base = load_base(spec.base_model)
    data = TrainData.from_spec(spec)
    before = eval_denoise_loss(base, data)
    WeightPatcher(base).apply([(read_kohya(out["lora"]), 1.0)])
    after = eval_denoise_loss(base, data)
    assert after <= 0.8 * before, f"{algo}: loss {before:.4f} -> {after:.4f}"


def test_state_checkpoint_and_runtime_control() -> None:
    base = load_base("tiny-sd15")
    # optimizer groups (trainer.network.groups): the text encoders, when trained, at their own rate
    te = LycorisNetwork.create(base, "loha", 4, 2.0, train_text_encoder=True, seed=3)
    assert te.trains_unet and te.trains_text_encoder
    assert [(g["name"], g["lr"]) for g in te.param_groups(1e-4, 1e-5)] == [("unet", 1e-4), ("te", 1e-5)]
    te.remove()
    net = _random_network(base, "lokr", 2, False)
    assert net.trains_unet and not net.trains_text_encoder
    assert [(g["name"], g["lr"]) for g in net.param_groups(1e-4, 1e-5)] == [("unet", 1e-4)]
    state = net.network_state()
    layer_name, (t, _) = next(iter(net.mods.items()))
    layer = target_layer(base, t)
    x = torch.randn(1, layer.in_channels if isinstance(layer, torch.nn.Conv2d) else layer.in_features,
                    *((4, 4) if isinstance(layer, torch.nn.Conv2d) else ()))
    y = layer(x)
    net.enable(False)
    y_off = layer(x)
    net.enable(True)
    assert torch.allclose(layer(x), y) and not torch.allclose(y_off, y)
    net.remove()
    other = LycorisNetwork.create(base, "lokr", 4, 2.0, conv_dim=2, conv_alpha=1.0, seed=3)
    other.load_network_state(state)
    assert torch.allclose(layer(x), y, atol=1e-6)
    with pytest.raises(LycorisStateError, match="do(es)? not match"):
        other.load_network_state({k: v for k, v in state.items() if not k.startswith(layer_name)})
    other.remove()
    # the modules live beside the base's models: moving the base does not move them, network.to() does
    moved = LycorisNetwork.create(base, "dora", 4, 2.0, seed=3)
    base.unet.to("meta")
    moved.to("meta")
    assert {p.device.type for p in moved.trainable_parameters()} == {"meta"}


def test_merge_converts_loha_to_lora_and_refuses_dora(tmp_path: Path) -> None:
    base = load_base("tiny-sd15")
    loha = _random_network(base, "loha", 2, False)
    loha.save(tmp_path / "loha.safetensors", {}, torch.float32)
    loha.remove()
    dora = _random_network(base, "dora", 0, False)
    dora.save(tmp_path / "dora.safetensors", {}, torch.float32)
    dora.remove()
    src = read_kohya(tmp_path / "loha.safetensors")
    merged = read_kohya(svd_merge([(src, 0.5)], clamp=False))  # rank auto: the converted layers' own rank
    assert merged.is_plain and merged.modules.keys() == src.modules.keys()
    for n, m in src.modules.items():
        exact = 0.5 * m.delta()
        got = merged.modules[n].delta().reshape(exact.shape)
        assert (got - exact).norm() <= 1e-4 * exact.norm(), n
    with pytest.raises(MergeError, match="DoRA.*into a checkpoint"):
        svd_merge([(tmp_path / "dora.safetensors", 1.0)])


def test_metadata_and_spec() -> None:
    from trainer.format.metadata import build_metadata
    from trainer.spec import NetworkSpec

    md = build_metadata("sd1", 8, 4, 4, 1, base_model_name="m", output_name="o", resolution=512,
                        network_type="dora")
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False",
                                                 "conv_dim": "4", "conv_alpha": "1"}
    assert json.loads(build_metadata("sdxl", 8, 4, base_model_name="m", output_name="o", resolution=1024,
                                     network_type="lokr")["ss_network_args"]) == {"algo": "lokr"}
    assert NetworkSpec(type="LoKr").type == "lokr" and NetworkSpec(type="locon").type == "lora"
    with pytest.raises(ValueError, match="ia3 is not offered: ComfyUI cannot load IA3"):
        NetworkSpec(type="ia3")
    with pytest.raises(ValueError, match="not available for network type loha"):
        NetworkSpec(type="loha", rank_dropout=0.1)
    with pytest.raises(ValueError, match="factor 4 is for network type lokr only"):
        NetworkSpec(type="loha", factor=4)
    md = build_metadata("sd1", 8, 4, base_model_name="m", output_name="o", resolution=512, network_type="lokr",
                        network_args={"factor": 4})
    assert json.loads(md["ss_network_args"]) == {"algo": "lokr", "factor": "4"}  # as LyCORIS' users write it


def test_lokr_factor_sets_the_small_kronecker_factor() -> None:
    base = load_base("tiny-sd15")
    net = LycorisNetwork.create(base, "lokr", 4, 2.0, factor=2, seed=0)
    state = net.network_state()
    w1 = {tuple(v.shape) for k, v in state.items() if k.endswith(".lokr_w1")}
    assert w1 == {(2, 2)}, w1  # out and in split as 2 x (size / 2)
    net.remove()


def test_header_checks_and_refusals(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from bot.lorafile import LoraCheckError, inspect_file
    from trainer.jobs.cli import describe_lora

    base = load_base("tiny-sd15")
    net = _random_network(base, "loha", 2, False)
    path = tmp_path / "loha.safetensors"
    net.save(path, {"ss_base_model_version": "sd_v1"}, torch.float16)
    info = inspect_file(path)
    assert info.rank == 4 and info.conv_rank == 2 and info.arch == "sd1" and info.kind_name == "LoHa"
    assert "LyCORIS LoHa for sd1" in describe_lora(read_kohya(path), path)  # `trainer inspect`
    tensors = file_modules(path)
    name = next(n for n in tensors if n.endswith("_conv1"))
    flat = {f"{n}.{p}": v for n, ps in tensors.items() for p, v in ps.items()}
    broken = dict(flat)
    broken[f"{name}.hada_w2_b"] = torch.zeros(3, flat[f"{name}.hada_w2_b"].shape[1])
    save_file(broken, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraCheckError, match="mismatched LoHa ranks"):
        inspect_file(tmp_path / "bad.safetensors")
    with pytest.raises(LoraFileError, match="mismatched LoHa ranks"):
        read_kohya(tmp_path / "bad.safetensors")
    mixed = dict(flat)
    mixed[f"{name}.lokr_w1"] = torch.zeros(2, 2)
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraCheckError, match="mixes LoHa tensors with others"):
        inspect_file(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize(("algo", "model"), [("dora", "tiny-sdxl"), ("lokr", "tiny-sd15")])
def test_merge_into_a_single_file_checkpoint_equals_the_applied_file(tmp_path: Path, algo: str, model: str) -> None:
    """Baked into an A1111 single file (SGM keys, SDXL's stacked OpenCLIP q/k/v) = applied at runtime."""
    from trainer.jobs.merge import merge_into_checkpoint
    from trainer.models.single_file import materialize_tiny_single_file

    ckpt = materialize_tiny_single_file(model)
    base = load_base(ckpt)
    net = _random_network(base, algo, 2, True)
    path = tmp_path / "net.safetensors"
    net.save(path, {}, torch.float32)
    net.remove()
    layers = {n: target_layer(base, t) for n, (t, _) in net.mods.items()}
    WeightPatcher(base).apply([(read_kohya(path), 0.8)])
    baked = load_base(merge_into_checkpoint(ckpt, [(read_kohya(path), 0.8)], tmp_path / "baked.safetensors"))
    for n, (t, _) in net.mods.items():
        assert torch.allclose(target_layer(baked, t).weight, layers[n].weight, atol=1e-5, rtol=1e-4), n


def test_merge_job_says_it_converted(tmp_path: Path) -> None:
    from bot.humanize import summary_text
    from trainer.events import JobFailed
    from trainer.jobs.merge import run_merge_job
    from trainer.spec import parse_job

    base = load_base("tiny-sd15")
    for algo in ("lokr", "dora"):
        net = _random_network(base, algo, 0, False)
        net.save(tmp_path / f"{algo}.safetensors", {}, torch.float32)
        net.remove()
    spec = parse_job({"kind": "merge", "inputs": [{"path": str(tmp_path / "lokr.safetensors"), "ratio": 0.5}]})
    events: list[dict[str, Any]] = []
    out = run_merge_job(spec, tmp_path / "job", events.append)
    assert read_kohya(out["lora"]).is_plain
    text = summary_text(events[-1]["summary"])
    assert "converted to LoRA by SVD" in text and "lokr.safetensors (LoKr)" in text, text
    spec = parse_job({"kind": "merge", "inputs": [{"path": str(tmp_path / "dora.safetensors")}]})
    with pytest.raises(JobFailed, match="DoRA") as err:
        run_merge_job(spec, tmp_path / "job2")
    assert err.value.reason == "bad_input"
