"""Speed settings that must not change the maths: the VAE / text encoders freed once their outputs are cached,
AdamW's foreach step (bit-identical to torch's per-tensor loop on CPU), and the compile / channels-last rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.spec import OptimizerSpec, SpecError, TrainSpec, resolve_job
from trainer.train.loop import Trainer
from trainer.train.optim import build_optimizer
from trainer.train.speed import COMPILE_AUTO_MIN_STEPS, resolve_channels_last, resolve_compile

CACHED = {"data": {"cache_latents": True, "cache_text_encoder_outputs": True}, "steps": 2}


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_encoders_are_freed_once_everything_they_compute_is_cached(tmp_path: Path, module_dataset: Path,
                                                                    make_spec) -> None:
    events: list[dict] = []
    tr = Trainer(make_spec(module_dataset, **CACHED), tmp_path / "job", events.append, device="cpu",
                 free_cached_models=True)
    tr.run()
    assert _devices(tr.base.vae) == {"meta"}
    assert _devices(tr.base.text_encoders[0]) == {"meta"}
    assert _devices(tr.base.unet) == {"cpu"}
    assert (tmp_path / "job" / "outputs" / "lora.safetensors").is_file()
    assert any("freed the VAE and the text encoder" in e.get("message", "") for e in events)


def test_encoders_stay_when_samples_need_them(tmp_path: Path, module_dataset: Path, make_spec) -> None:
    calls: list[int] = []
    spec = make_spec(module_dataset, sample={"prompts": [{"prompt": "scs girl"}]}, **CACHED)
    tr = Trainer(spec, tmp_path / "job", device="cpu", sample_hook=lambda step, net: calls.append(step) or [],
                 free_cached_models=True)
    tr.run()
    assert calls and _devices(tr.base.vae) == {"cpu"} and _devices(tr.base.text_encoders[0]) == {"cpu"}


def test_a_base_its_caller_reuses_is_never_freed(tmp_path: Path, module_dataset: Path, make_spec) -> None:
    """The copy-machine's second pass and its copier check run the same base after the first pass's run()."""
    tr = Trainer(make_spec(module_dataset, **CACHED), tmp_path / "job", device="cpu")
    tr.run()
    assert _devices(tr.base.vae) == {"cpu"} and _devices(tr.base.text_encoders[0]) == {"cpu"}


def test_adamw_steps_bit_identical_to_torch_per_tensor_loop() -> None:
    torch.manual_seed(0)
    shapes = [(16, 64), (64, 16), (8, 320), (320, 8)] * 10
    start = [torch.randn(s) for s in shapes]

    def train(make) -> list[torch.Tensor]:
        ps = [p.clone().requires_grad_(True) for p in start]
        opt = make(ps)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
        return ps

    spec = OptimizerSpec(name="AdamW", lr=1e-3, weight_decay=0.01)
    ours = train(lambda ps: build_optimizer(spec, ps)[0])
    loop = train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, loop, strict=True))


def test_compile_and_channels_last_rules() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu, 100_000)[0] is False
    assert resolve_compile("auto", gpu, COMPILE_AUTO_MIN_STEPS - 1)[0] is False
    assert resolve_compile("auto", gpu, COMPILE_AUTO_MIN_STEPS)[0] is True
    assert resolve_compile(True, cpu, 10)[0] is True and resolve_compile(False, gpu, 10**5)[0] is False
    assert "too short" in resolve_compile("auto", gpu, 50)[1]
    assert resolve_channels_last("auto", cpu) is False and resolve_channels_last("auto", gpu) is True
    assert resolve_channels_last(True, cpu) is True


def test_compile_setting_in_job_files() -> None:
    assert TrainSpec().compile == "auto" and TrainSpec().channels_last == "auto"
    assert TrainSpec(compile=True, channels_last=False).compile is True
    with pytest.raises(SpecError, match="compile"):
        resolve_job({"compile": "sometimes"})


def test_compiled_unet_trains_like_the_plain_one(tmp_path: Path, module_dataset: Path, make_spec,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """compile = true: the job runs through TorchDynamo and gives the eager UNet's losses.

    Dynamo's "eager" backend: the same graph capture, guards and graph breaks as inductor, without its code
    generation (minutes on 2 CPU cores for the tiny UNet; the inductor timing is the bench's ours-compile side)."""
    plain_compile = torch.nn.Module.compile
    compiled: list[str] = []

    def eager_backend_compile(self: torch.nn.Module, *args, **kwargs) -> None:
        compiled.append(type(self).__name__)
        plain_compile(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_backend_compile)
    torch._dynamo.reset()
    losses = {}
    for flag in (False, True):
        tr = Trainer(make_spec(module_dataset, compile=flag, **CACHED), tmp_path / f"job-{flag}", device="cpu")
        tr.run()
        losses[flag] = [v for _, v in tr.loss_history]
    assert compiled == ["UNet2DConditionModel"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def test_job_processes_import_bitsandbytes_only_for_8bit_optimizers() -> None:
    """The CLI / worker defer bitsandbytes (peft and diffusers would import it, and it compiles kernels at import);
    an 8-bit optimizer still gets it."""
    import subprocess
    import sys

    code = ("import sys\nfrom trainer import bnb_gate\nbnb_gate.defer()\n"
            "import peft.tuners.lora, diffusers.models.modeling_utils, trainer.network.lora\n"
            "assert sys.modules['bitsandbytes'] is None, 'bitsandbytes was imported'\n"
            "import torch\nfrom trainer.spec import OptimizerSpec\nfrom trainer.train.optim import build_optimizer\n"
            "opt, _ = build_optimizer(OptimizerSpec(name='AdamW8bit', lr=1e-3), [torch.zeros(64, 64, requires_grad=True)])\n"
            "print(type(opt).__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("bitsandbytes")
