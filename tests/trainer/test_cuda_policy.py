"""The CUDA path, checked on CPU: what would reach a GPU, in which dtype, and the precision chosen per device.

A fake "cuda" device: `nn.Module.to` is wrapped so that a move to cuda is recorded (module, the dtypes of its frozen
floating-point weights) and then left on the CPU; the setup of a real Trainer runs against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from trainer.train import prior
from trainer.train.loop import Trainer


class CudaMoves:
    """Records every move of a module to a cuda device and keeps the module on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.moves: list[tuple[str, set[torch.dtype]]] = []
        self.where: list[tuple[nn.Module, str]] = []  # every move with a device: (module, device type)
        real = nn.Module.to

        def to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None:
                self.where.append((module, device.type))
            if device is not None and device.type == "cuda":
                real(module, dtype=dtype) if dtype is not None else None
                frozen = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
                self.moves.append((type(module).__name__, frozen))
                return module
            return real(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 6))
        # a 24 GB card (the memory plan of "auto" gradient checkpointing asks for its size)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SimpleNamespace(total_memory=24 << 30))


def _fake_render(base: Any, **kw: Any):
    def render(prompt: str, seed: int, w: int, h: int) -> Image.Image:
        return Image.new("RGB", (w, h), (120 + seed % 50, 90, 60))

    return render


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_frozen_weights_reach_the_gpu_only_in_the_compute_dtype(tmp_path: Path, dataset: Path, make_spec, mp: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    moves = CudaMoves(monkeypatch)
    monkeypatch.setattr(prior, "default_render", _fake_render)
    # class images are generated first (the base goes to the GPU for them), then the base moves for training
    spec = make_spec(dataset, steps=1, mixed_precision=mp,
                     concepts=[{"image_dir": str(dataset), "instance_prompt": "scs girl", "class_prompt": "girl",
                                "class_dir": str(tmp_path / "class"), "class_count": 1}])
    tr = Trainer(spec, tmp_path / "job", device="cuda")
    tr.setup()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[mp]
    unet_te = [(name, dtypes) for name, dtypes in moves.moves if name != "AutoencoderKL"]
    assert {name for name, _ in unet_te} == {"UNet2DConditionModel", "CLIPTextModel"}
    assert len(unet_te) >= 4  # for the class images and again for training
    for name, dtypes in unet_te:
        assert dtypes == {half}, f"{name} went to the GPU holding {dtypes} weights"
    # the LoRA weights stay float32 (trainable, not touched by the cast)
    assert {p.dtype for p in tr.params} == {torch.float32}


def test_images_are_decoded_in_float32_even_under_half_autocast() -> None:
    from trainer.infer.pipeline import build_pipeline, render_image
    from trainer.models.load import load_base

    base = load_base("tiny-sd15")
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    hook = base.vae.decoder.conv_out.register_forward_hook(
        lambda m, args, out: seen.append((m.weight.dtype, out.dtype)))
    try:
        # what the trainer does for samples and class images when it computes in half precision
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            img = render_image(build_pipeline(base), base, "a cat", "", 1, 2, 7.0, 64, 64, "euler")
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert img.size == (64, 64)


def test_a_black_class_image_is_refused_not_saved(tmp_path: Path) -> None:
    from trainer.events import JobFailed
    from trainer.spec import Concept

    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=2, class_dir=str(tmp_path / "cls"))
    with pytest.raises(JobFailed) as e:
        prior.ensure_class_images(concept, None, "tiny-sd15", tmp_path / "cache", resolution=64,
                                  render=lambda prompt, seed, w, h: Image.new("RGB", (w, h), (0, 0, 0)))
    assert e.value.reason == "nan" and "all black" in str(e.value) and "bf16" in str(e.value)
    assert not list((tmp_path / "cls").glob("*.png"))


def test_auto_precision_uses_native_bf16_of_the_jobs_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.train.precision import resolve_mixed_precision, resolve_precision

    capability = {"cuda:0": (8, 6), "cuda:1": (7, 5)}  # an RTX 3090 and an RTX 2080 Ti in one machine
    asked: list[str] = []

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        asked.append(str(device))
        return capability[str(device)]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation on Turing
    assert resolve_mixed_precision("auto", torch.device("cuda:0")) == "bf16"
    assert resolve_mixed_precision("auto", torch.device("cuda:1")) == "fp16"  # fp16 + GradScaler, not slow bf16
    assert asked == ["cuda:0", "cuda:1"]
    fp16 = resolve_precision("auto", torch.device("cuda:1"))
    assert fp16.autocast_dtype == torch.float16 and fp16.scaler is not None
    emulated = resolve_precision("bf16", torch.device("cuda:1"))  # asked for explicitly: runs, with a warning
    assert emulated.autocast_dtype == torch.bfloat16 and "only emulates bf16" in (emulated.note or "")
    assert resolve_precision("bf16", torch.device("cuda:0")).note is None


class _Caches:
    """TrainData's cache interface, encoding nothing (the policy is what is tested)."""

    captions_vary = False

    def __init__(self) -> None:
        self.text_cached_on: list[str] = []

    def cache_latents(self, vae: Any, progress: Any) -> None:
        pass

    def check_images(self, progress: Any) -> None:
        pass

    def cache_text(self, base: Any, device: Any) -> None:
        self.text_cached_on.append(str(device))


@pytest.mark.parametrize("train_te", [False, True])
def test_text_encoders_leave_the_gpu_once_their_outputs_are_cached(dataset: Path, make_spec, train_te: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext
    from types import SimpleNamespace

    from trainer.data.cache import cache_inputs

    moves = CudaMoves(monkeypatch)
    te1, te2, vae = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    base = SimpleNamespace(vae=vae, text_encoders=[te1, te2])
    data = _Caches()
    spec = make_spec(dataset, network={"train_text_encoder": train_te})
    offloaded = cache_inputs(spec, data, base, torch.device("cuda"), train_te, nullcontext, lambda e: None,
                             lambda name: lambda current, total: None)
    last = {id(m): where for m, where in moves.where}
    if train_te:  # the text encoders run every step: they stay
        assert not offloaded and data.text_cached_on == [] and id(te1) not in last
    else:
        assert offloaded and data.text_cached_on == ["cuda"]
        assert last[id(te1)] == last[id(te2)] == "cpu"
    assert last[id(vae)] == "cpu"  # latents cached, no samples: the VAE is not needed on the card either


class _Model:
    """Stands for a loaded base: what a failed job's frames hold on to."""


@pytest.mark.parametrize("error", ["oom", "nan", "bug"])
def test_runner_frees_gpu_memory_after_the_failure_is_dropped(tmp_path: Path, dataset: Path, make_spec,
                                                              monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    import weakref

    from trainer.events import JobFailed
    from trainer.jobs import runner
    from trainer.train import loop

    models: list[weakref.ref[_Model]] = []

    def failing_train(spec: Any, job_dir: Path, **kw: Any) -> None:
        model = _Model()  # a local of the failing frame, as the Trainer is in a real failure
        models.append(weakref.ref(model))
        if error == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if error == "nan":
            raise JobFailed("loss became NaN at step 3", reason="nan")
        raise KeyError("x")

    freed_with_model_alive: list[bool] = []
    monkeypatch.setattr(loop, "train", failing_train)
    monkeypatch.setattr(runner, "_free_gpu_memory", lambda: freed_with_model_alive.append(models[0]() is not None))
    with pytest.raises(JobFailed) as e:
        runner.run_job(make_spec(dataset, steps=1), tmp_path / "job")
    assert freed_with_model_alive == [False]  # freed once, and only after the model could be collected
    assert e.value.__cause__ is None and e.value.__context__ is None  # nothing chains back to the engine's frames
    assert e.value.reason == {"oom": "oom", "nan": "nan", "bug": "error"}[error]


def test_step_losses_are_read_at_progress_cadence_not_every_micro_step(tmp_path: Path, dataset: Path, make_spec,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """float(loss) makes the CPU wait for the GPU: the loop reads the losses in one go when it reports."""
    from trainer.train import loop

    loss_storages: set[int] = set()
    kept: list[torch.Tensor] = []
    reads: list[str] = []
    real_loss = Trainer.micro_step_loss

    def micro_step_loss(self: Trainer, step: int, micro: int) -> torch.Tensor:
        out = real_loss(self, step, micro)
        kept.append(out.detach())  # alive to the end: no other tensor can take its storage's address
        loss_storages.add(out.untyped_storage().data_ptr())
        return out

    def counting(name: str) -> Any:
        real = getattr(torch.Tensor, name)

        def read(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            if t.untyped_storage().data_ptr() in loss_storages:
                reads.append(name)
            return real(t, *a, **k)

        return read

    monkeypatch.setattr(Trainer, "micro_step_loss", micro_step_loss)
    for name in ("__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(loop, "PROGRESS_EVERY_S", 3600.0)  # one progress event: the last step
    events: list[dict[str, Any]] = []
    spec = make_spec(dataset, steps=4, grad_accum=2)
    Trainer(spec, tmp_path / "job", events.append).run()
    assert len(loss_storages) == 8 and reads == []  # 8 micro-steps, none read on its own
    history = json.loads((tmp_path / "job" / "outputs" / "loss.json").read_text())
    assert history["steps"] == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in history["loss"])
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 4 and progress[-1]["loss_raw"] == history["loss"][-1]


def test_xformers_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from trainer.spec import TrainSpec
    from trainer.train.precision import enable_fast_attention

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))  # "installed"

    class UNet:
        calls = 0

        def enable_xformers_memory_efficient_attention(self) -> None:
            UNet.calls += 1

    cuda = torch.device("cuda")
    assert TrainSpec.model_fields["xformers"].default is False
    assert enable_fast_attention(UNet(), cuda) == "PyTorch SDPA" and UNet.calls == 0  # the default: SDPA
    assert enable_fast_attention(UNet(), cuda, use_xformers=True) == "xformers memory-efficient attention"
    assert UNet.calls == 1
    assert "needs a GPU" in enable_fast_attention(UNet(), torch.device("cpu"), use_xformers=True)
    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed: said, and SDPA runs
    assert "not installed" in enable_fast_attention(UNet(), cuda, use_xformers=True) and UNet.calls == 1


def test_resume_says_what_it_reproduces_on_each_device() -> None:
    from trainer.train.state import resume_note

    cpu, cuda = resume_note(torch.device("cpu"), 4), resume_note(torch.device("cuda"), 4)
    for note in (cpu, cuda):
        assert note.startswith("resumed from step 4") and "same data order" in note and "RNG states" in note
    assert "bit-exact" in cpu and "bit-exact" not in cuda
    assert "not bit-deterministic" in cuda and "not bit for bit" in cuda


@pytest.mark.parametrize("card", ["small", "big"])
def test_auto_gradient_checkpointing_follows_the_memory_plan(tmp_path: Path, dataset: Path, make_spec, card: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, "auto" checkpointing is on only when the plan says the job does not fit the card without it;
    the choice and its reason are in the job's log."""
    from trainer.plan import plan_job

    spec = make_spec(dataset, steps=1, mixed_precision="bf16")
    assert spec.gradient_checkpointing is None
    without = plan_job(spec, gradient_checkpointing=False).total
    with_gc = plan_job(spec, gradient_checkpointing=True).total
    assert with_gc < without
    size = (with_gc + without) // 2 if card == "small" else without * 4
    CudaMoves(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SimpleNamespace(total_memory=size))
    logs: list[str] = []
    tr = Trainer(spec, tmp_path / "job", device="cuda",
                 on_event=lambda e: logs.append(e["message"]) if e["type"] == "log" else None)
    tr.setup()
    assert tr.gradient_checkpointing is (card == "small")
    assert tr.base.unet.is_gradient_checkpointing is (card == "small")
    word = "on" if card == "small" else "off"
    why = [m for m in logs if m.startswith(f"gradient checkpointing {word}: ")]
    assert why and "without it; card" in why[0], logs


def test_auto_gradient_checkpointing_on_cpu_is_off_without_asking_the_card(monkeypatch: pytest.MonkeyPatch,
                                                                           dataset: Path, make_spec) -> None:
    from trainer.train.precision import choose_gradient_checkpointing

    def no_card(*a: Any, **k: Any) -> Any:
        raise AssertionError("the CPU path asked for a GPU's properties")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_card)
    spec = make_spec(dataset, steps=1)
    assert choose_gradient_checkpointing(spec, "sdxl", torch.device("cpu")) == (False, None)
    forced = make_spec(dataset, steps=1, gradient_checkpointing=True)
    assert choose_gradient_checkpointing(forced, "sd1", torch.device("cuda")) == (True, None)
