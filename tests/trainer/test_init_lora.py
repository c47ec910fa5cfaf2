"""`init_lora` (kohya's network_weights): a job starts from an existing LoRA, checked for architecture and rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.events import JobFailed
from trainer.train.loop import Trainer, train


def _set_up(spec, tmp_path: Path) -> Trainer:
    tr = Trainer(spec, tmp_path / "job")
    tr.setup()
    return tr


def test_a_job_starts_from_the_given_lora_and_one_that_does_not_fit_is_refused(tmp_path: Path, dataset: Path,
                                                                               make_spec) -> None:
    # a 2-step LoRA with text-encoder modules (dim 4, alpha 4), as `trainer train` writes it
    te_lora = Path(train(make_spec(dataset, steps=2, network={"train_text_encoder": True}, optimizer={"lr": 1e-2},
                                   save_precision="fp32"), tmp_path / "first")["lora"])
    saved = load_file(str(te_lora))
    tr = _set_up(make_spec(dataset, steps=1, init_lora=str(te_lora), network={"train_text_encoder": True}), tmp_path)
    now = tr.network.network_state()
    assert now.keys() == saved.keys()
    for k in saved:
        assert torch.equal(now[k], saved[k].float()), k
    # another alpha: the up weights are rescaled so the LoRA's effect (up @ down * alpha / rank) is the file's
    tr2 = _set_up(make_spec(dataset, steps=1, init_lora=str(te_lora),
                            network={"train_text_encoder": True, "alpha": 2}), tmp_path / "b")
    k = next(k for k in saved if k.endswith(".lora_up.weight"))
    assert torch.allclose(tr2.network.network_state()[k], saved[k].float() * 2)

    # what does not fit is refused saying what to change
    with pytest.raises(JobFailed, match=r"has rank 4 .* network\.dim is 8; set network\.dim = 4") as e:
        _set_up(make_spec(dataset, steps=1, init_lora=str(te_lora),
                          network={"train_text_encoder": True, "dim": 8}), tmp_path / "c")
    assert e.value.reason == "bad_input"
    with pytest.raises(JobFailed, match="not trained by this job .* turn network.train_text_encoder on"):
        _set_up(make_spec(dataset, steps=1, init_lora=str(te_lora)), tmp_path / "d")
    # a LoRA for another architecture: an SDXL UNet block this base does not have
    alien = tmp_path / "sdxl.safetensors"
    name = "lora_unet_output_blocks_8_1_transformer_blocks_9_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(640, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(alien))
    with pytest.raises(JobFailed, match="init_lora: sdxl.safetensors is an SDXL LoRA but the base is SD1"):
        _set_up(make_spec(dataset, steps=1, init_lora=str(alien)), tmp_path / "c")
