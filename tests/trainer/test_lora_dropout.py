"""kohya's network_dropout / rank_dropout / module_dropout on the peft LoRA layers, against kohya's
LoRAModule.forward (networks/lora.py) written out here, with the same weights and the same global RNG seed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from trainer.network.dropout import Dropouts, install

torch.set_num_threads(1)


def kohya_forward(org: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float, x: torch.Tensor,
                  dropout: float | None, rank_dropout: float | None, module_dropout: float | None,
                  training: bool = True) -> torch.Tensor:
    """kohya's LoRAModule.forward, term by term (multiplier 1)."""
    conv = down.dim() == 4
    org_forwarded = org(x)
    if module_dropout is not None and training and torch.rand(1) < module_dropout:
        return org_forwarded
    lx = (nn.functional.conv2d(x, down, padding=org.padding) if conv else x @ down.T)
    if dropout is not None and training:
        lx = torch.nn.functional.dropout(lx, p=dropout)
    if rank_dropout is not None and training:
        mask = torch.rand((lx.size(0), down.shape[0]), device=lx.device) > rank_dropout
        if len(lx.size()) == 3:
            mask = mask.unsqueeze(1)
        elif len(lx.size()) == 4:
            mask = mask.unsqueeze(-1).unsqueeze(-1)
        lx = lx * mask
        scale = scale * (1.0 / (1.0 - rank_dropout))
    lx = nn.functional.conv2d(lx, up) if conv else lx @ up.T
    return org_forwarded + lx * scale


def peft_layer(conv: bool, rank: int = 4, alpha: float = 2.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    org = nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(12, 10)
    model = nn.Sequential(org)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0), model,
                            adapter_name="a")
    layer = model[0]
    with torch.no_grad():  # up is zero-initialised: give it values so the LoRA branch shows
        layer.lora_B["a"].weight.normal_()
    return model, layer


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("drops", [(0.3, None, None), (None, 0.25, None), (None, None, 0.5), (0.2, 0.3, 0.4)])
def test_forward_matches_kohyas_lora_module(conv, drops):
    model, layer = peft_layer(conv)
    d = Dropouts(*(v or 0.0 for v in drops))
    install(layer, "a", d)
    x = torch.randn(3, 6, 5, 5) if conv else torch.randn(3, 7, 12)  # UNet/TE linears see [batch, tokens, features]
    down = layer.lora_A["a"].weight.detach()
    up = layer.lora_B["a"].weight.detach()
    org = layer.get_base_layer()
    model.train()
    outs = []
    for seed in range(12):  # several draws: module dropout both fires and not
        torch.manual_seed(seed)
        got = model(x)
        torch.manual_seed(seed)
        want = kohya_forward(org, down, up, 2.0 / 4, x, *drops)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # the dropouts do vary per step
    # evaluation (samples): no dropout at all, as kohya's `self.training`
    model.eval()
    torch.testing.assert_close(model(x), kohya_forward(org, down, up, 0.5, x, None, None, None), rtol=1e-5,
                               atol=1e-5)


def test_module_dropout_skips_the_whole_lora_at_about_its_rate():
    model, layer = peft_layer(False)
    install(layer, "a", Dropouts(module_dropout=0.3))
    x = torch.randn(2, 12)
    base = layer.get_base_layer()(x)
    torch.manual_seed(1)
    skipped = sum(torch.equal(model(x), base) for _ in range(400))
    assert 0.22 < skipped / 400 < 0.38


def test_ranges_are_checked():
    with pytest.raises(ValueError, match="rank_dropout"):
        Dropouts(rank_dropout=1.0)
    assert not Dropouts().any and math.isclose(Dropouts(dropout=0.1).dropout, 0.1)


def test_spec_metadata_and_kohya_import_name_them_as_kohya():
    from trainer.kohya_import import translate
    from trainer.spec import parse_job
    from trainer.train.outputs import training_metadata

    spec = parse_job({"kind": "train", "concepts": [{"image_dir": "x"}],
                      "network": {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05, "conv_dim": 4}})
    md = training_metadata(spec, "sd1", 1, [], "no", False, "epsilon")
    assert md["ss_network_dropout"] == "0.1"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4", "rank_dropout": "0.2",
                                                 "module_dropout": "0.05"}
    out = translate({"network_dim": 8, "network_dropout": 0.1,
                     "network_args": ["rank_dropout=0.2", "module_dropout=0.05"]})
    net = out.values["network"]
    assert (net["dropout"], net["rank_dropout"], net["module_dropout"]) == (0.1, 0.2, 0.05)
