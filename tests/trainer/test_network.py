"""LoRA/LoCon network: files we write load in diffusers and in our own importer with identical outputs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(1)

from trainer.format.kohya import read_kohya  # noqa: E402
from trainer.format.metadata import build_metadata  # noqa: E402
from trainer.models.base import BaseModel  # noqa: E402
from trainer.models.load import load_base  # noqa: E402
from trainer.network.lora import (  # noqa: E402
    LoraNetwork,
    NetworkStateError,
    apply_kohya_file,
    merge_into_weights,
)

ATOL = 1e-5


def _inputs(base: BaseModel) -> dict:
    g = torch.Generator().manual_seed(3)
    kw = {
        "ids": torch.randint(0, 300, (2, 77), generator=g),
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 500]),
        "ehs": torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=g),
    }
    if base.arch == "sdxl":
        proj = base.text_encoders[1].config.projection_dim
        kw["added"] = {"text_embeds": torch.randn(2, proj, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return kw


@torch.no_grad()
def _outputs(base: BaseModel, inp: dict) -> list[torch.Tensor]:
    outs = []
    for te in base.text_encoders:
        o = te(inp["ids"], output_hidden_states=True)
        outs += [o.hidden_states[-2], o.last_hidden_state]
    extra = {"added_cond_kwargs": inp["added"]} if "added" in inp else {}
    outs.append(base.unet(inp["x"], inp["t"], inp["ehs"], **extra).sample)
    return outs


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _randomize(net: LoraNetwork, seed: int = 1) -> None:
    # B starts at zero (the network is a no-op at init); random A and B make the comparisons meaningful
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _pipeline(base: BaseModel):
    if base.arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=base.unet,
                                         scheduler=base.noise_scheduler)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_round_trip_diffusers_and_ours(model, tmp_path):
    base = load_base(model)
    inp = _inputs(base)
    plain = _outputs(base, inp)
    net = LoraNetwork.create(base, dim=8, alpha=4, conv_dim=4, conv_alpha=2, train_text_encoder=True, seed=0)
    assert _max_diff(_outputs(base, inp), plain) == 0.0  # B = 0: a fresh network changes nothing
    _randomize(net)
    trained = _outputs(base, inp)
    assert all(float((a - b).abs().max()) > 1e-2 for a, b in zip(trained, plain, strict=True))  # every part moved

    path = tmp_path / "lora.safetensors"
    md = build_metadata(base.arch, 8, 4, 4, 2, base_model_name=model, output_name="lora", resolution=512)
    net.save(path, md, dtype=torch.float32)
    sd = load_file(path)
    assert any("_resnets_" in k or "_in_layers_" in k for k in sd)  # conv modules are in the file
    assert any(k.startswith(("lora_te_", "lora_te2_")) for k in sd)
    if base.arch == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in sd)
        assert not any(k.startswith("lora_unet_down_blocks") for k in sd)

    # diffusers' own kohya loader, on a fresh base through our loading code
    fresh = load_base(model)
    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(path))
    assert _max_diff(_outputs(fresh, inp), trained) < ATOL
    pipe.unload_lora_weights()
    assert _max_diff(_outputs(fresh, inp), plain) < ATOL

    # our importer on the same fresh base
    applied = apply_kohya_file(fresh, path)
    assert _max_diff(_outputs(fresh, inp), trained) < ATOL
    assert not any(p.requires_grad for p in applied.trainable_parameters())  # applied files are frozen
    applied.set_multiplier(0.0)
    assert _max_diff(_outputs(fresh, inp), plain) < ATOL
    applied.set_multiplier(1.0)
    applied.enable(False)
    assert _max_diff(_outputs(fresh, inp), plain) < ATOL
    applied.enable(True)
    assert _max_diff(_outputs(fresh, inp), trained) < ATOL
    applied.remove()
    assert _max_diff(_outputs(fresh, inp), plain) == 0.0
    assert not any("lora" in n for n, _ in fresh.unet.named_modules())

    # merged into the weights gives the same function
    merge_into_weights(fresh, path)
    assert _max_diff(_outputs(fresh, inp), trained) < 1e-4


def test_state_multiplier_enable_remove():
    base = load_base("tiny-sd15")
    inp = _inputs(base)
    plain = _outputs(base, inp)
    net = LoraNetwork.create(base, dim=4, alpha=1, train_text_encoder=False, seed=5)
    assert [g["name"] for g in net.param_groups(1e-4, 5e-5)] == ["unet"]
    assert all(p.requires_grad for p in net.trainable_parameters())
    assert sum(p.requires_grad for p in base.unet.parameters()) == len(net.trainable_parameters())
    _randomize(net, 2)
    on = _outputs(base, inp)

    state = net.network_state()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(float(v) == 1.0 for k, v in state.items() if k.endswith(".alpha"))

    # multiplier: -1 subtracts exactly what +1 adds (to first order the LoRA is linear in its output scale)
    net.set_multiplier(-1.0)
    neg = _outputs(base, inp)[-1]
    assert float((neg - plain[-1]).abs().max()) > 1e-3
    net.set_multiplier(0.0)
    assert _max_diff(_outputs(base, inp), plain) < ATOL
    net.set_multiplier(1.0)
    net.enable(False)
    assert _max_diff(_outputs(base, inp), plain) == 0.0
    assert not any(p.requires_grad for p in net.trainable_parameters())
    net.enable(True)
    assert all(p.requires_grad for p in net.trainable_parameters())
    assert _max_diff(_outputs(base, inp), on) == 0.0

    # strict resume
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.zero_()
    net.load_network_state(state)
    assert _max_diff(_outputs(base, inp), on) == 0.0
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(NetworkStateError, match="missing"):
        net.load_network_state(bad)
    k = next(k for k in state if k.endswith(".lora_down.weight"))
    with pytest.raises(NetworkStateError, match="shapes"):
        net.load_network_state({**state, k: torch.zeros(state[k].shape[0] + 1, *state[k].shape[1:])})
    ka = next(k for k in state if k.endswith(".alpha"))
    with pytest.raises(NetworkStateError, match="alpha"):
        net.load_network_state({**state, ka: torch.tensor(3.0)})

    net.remove()
    assert type(base.unet.down_blocks[0].attentions[0].proj_in) is torch.nn.Conv2d
    assert _max_diff(_outputs(base, inp), plain) == 0.0
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_seed_blocks_and_groups():
    a = load_base("tiny-sdxl")
    n1 = LoraNetwork.create(a, dim=4, alpha=4, train_text_encoder=True, seed=7, blocks="OUT03-OUT05,BASE")
    s1 = n1.network_state()
    assert {t.block for t in n1.targets()} == {"BASE", "OUT03", "OUT04", "OUT05"}
    assert all(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_output_blocks_3_", "lora_unet_output_blocks_4_",
                             "lora_unet_output_blocks_5_")) for k in s1)
    groups = n1.param_groups(1e-4)
    assert [g["name"] for g in groups] == ["unet", "te"] and groups[1]["lr"] == 1e-4
    assert n1.param_groups(1e-4, 1e-5)[1]["lr"] == 1e-5
    n1.remove()
    n2 = LoraNetwork.create(a, dim=4, alpha=4, train_text_encoder=True, seed=7, blocks="OUT03-OUT05,BASE")
    assert all(torch.equal(v, n2.network_state()[k]) for k, v in s1.items())
    n2.remove()
    with pytest.raises(ValueError, match="valid blocks are"):
        LoraNetwork.create(a, dim=4, alpha=4, blocks="OUT11")


def test_applied_file_under_a_trained_network(tmp_path):
    """Difference mode: a frozen LoRA from a file plus a trainable one on the same layers."""
    base = load_base("tiny-sd15")
    inp = _inputs(base)
    first = LoraNetwork.create(base, dim=4, alpha=2, conv_dim=2, conv_alpha=1, seed=1)
    _randomize(first, 4)
    path = tmp_path / "copier.safetensors"
    first.save(path, build_metadata("sd1", 4, 2, 2, 1, base_model_name="tiny-sd15", output_name="c",
                                    resolution=64), dtype=torch.float32)
    with_copier = _outputs(base, inp)
    first.remove()

    frozen = apply_kohya_file(base, read_kohya(path))
    net = LoraNetwork.create(base, dim=8, alpha=8, seed=2)
    assert _max_diff(_outputs(base, inp), with_copier) < ATOL  # the new network starts as a no-op
    assert all(p.requires_grad for p in net.trainable_parameters())
    assert not any(p.requires_grad for p in frozen.trainable_parameters())
    trainable = {id(p) for p in net.trainable_parameters()}
    assert all(id(p) in trainable for p in base.unet.parameters() if p.requires_grad)
    frozen.enable(False)  # the trained network stays on and trainable
    assert all(p.requires_grad for p in net.trainable_parameters())
    frozen.enable(True)
    frozen.remove()
    assert all(p.requires_grad for p in net.trainable_parameters())
    assert all(float(v) == 8.0 for k, v in net.network_state().items() if k.endswith(".alpha"))
    net.remove()
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_apply_file_with_per_module_ranks_and_alphas():
    """Files from other trainers (resized / dynamic-rank): every module its own rank and alpha."""
    base = load_base("tiny-sdxl")
    inp = _inputs(base)
    plain = _outputs(base, inp)
    probe = LoraNetwork.create(base, 4, 4, conv_dim=4, conv_alpha=4, train_text_encoder=True)
    targets = probe.targets()
    probe.remove()
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i, t in enumerate(targets):
        r = 1 + i % 4
        sd[t.kohya_name + ".lora_down.weight"] = torch.randn(t.down_shape(r), generator=g) * 0.1
        sd[t.kohya_name + ".lora_up.weight"] = torch.randn(t.up_shape(r), generator=g) * 0.1
        sd[t.kohya_name + ".alpha"] = torch.tensor(0.5 + 0.01 * i)  # > 200 distinct (rank, alpha) pairs
    net = apply_kohya_file(base, sd, multiplier=0.7)
    for s in net.slots.values():
        assert s.layer.r[net.adapter] == s.rank
        assert s.layer.scaling[net.adapter] == pytest.approx(0.7 * s.alpha / s.rank)
    applied = _outputs(base, inp)
    net.remove()
    assert _max_diff(_outputs(base, inp), plain) == 0.0
    merge_into_weights(base, sd, multiplier=0.7)  # an independent path: dW = 0.7 * alpha / r * up @ down
    assert _max_diff(_outputs(base, inp), applied) < 1e-4
    assert _max_diff(applied, plain) > 1e-2
