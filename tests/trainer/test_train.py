"""The training loop on the tiny models: it learns, every optimizer and schedule works, the loss pieces
do what they say, and the ways a job ends (finished, cancelled, NaN, bad input) leave the right files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file

from trainer.data.dataset import TrainData
from trainer.events import JobCancelled, JobFailed
from trainer.jobs.runner import run_job
from trainer.spec import OptimizerSpec
from trainer.train import loop as train_mod
from trainer.train import losses as losses_mod
from trainer.train.loop import train
from trainer.train.losses import eval_denoise_loss, make_noise, min_snr_weight, per_sample_loss, weighted_loss
from trainer.train.optim import build_optimizer, build_scheduler, resolve_scheduler_name


def _fixed_noise_losses(spec, lora: str) -> tuple[float, float]:
    """Denoising loss on the training images at fixed noise/timesteps: base alone, then base + the LoRA file."""
    from trainer.models.load import load_base
    from trainer.network.lora import apply_kohya_file

    base = load_base(spec.base_model)
    data = TrainData.from_spec(spec)
    before = eval_denoise_loss(base, data)
    apply_kohya_file(base, lora)
    return before, eval_denoise_loss(base, data)


# --- it learns ----------------------------------------------------------------------------------------

LEARN_CASES = [
    # (model, conv_dim, train_te, steps, min_drop)
    pytest.param("tiny-sd15", 0, False, 60, 0.30, id="sd15-lora"),  # the demo recipe: ~43%
    pytest.param("tiny-sd15", 4, True, 40, 0.30, id="sd15-locon-te"),  # ~56%
    pytest.param("tiny-sdxl", 4, False, 40, 0.30, id="sdxl-locon"),  # ~58%
    pytest.param("tiny-sdxl", 4, True, 40, 0.30, id="sdxl-locon-te"),
    # SDXL, like tiny-sdxl, has no attention at its full-resolution level, and with RANDOM base weights the
    # fixed full-resolution resnets cannot pass the noise through, so attention-only LoRA plateaus near 11-12%
    # however long it trains (measured 60-250 steps, lr 3e-3..1e-2, dim 4-16); a pretrained SDXL base already
    # denoises, so this is a property of the random test model, not of the engine. This case checks that both
    # SDXL text encoders train and the loss still falls.
    pytest.param("tiny-sdxl", 0, True, 40, 0.05, id="sdxl-lora-te"),
    pytest.param("tiny-sd2", 0, False, 40, 0.20, id="sd2-vpred"),  # v-prediction: ~33%
]


@pytest.mark.parametrize(("model", "conv_dim", "train_te", "steps", "min_drop"), LEARN_CASES)
def test_training_lowers_denoising_loss(tmp_path: Path, module_dataset: Path, make_spec, model: str,
                                        conv_dim: int, train_te: bool, steps: int, min_drop: float) -> None:
    spec = make_spec(module_dataset, base_model=model, steps=steps,
                     network={"conv_dim": conv_dim, "conv_alpha": 4, "train_text_encoder": train_te})
    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append)
    before, after = _fixed_noise_losses(spec, out["lora"])
    assert after <= before * (1 - min_drop), f"{model}: loss {before:.4f} -> {after:.4f}"
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    last = [e for e in events if e["type"] == "progress"][-1]
    assert last["step"] == last["total"] == spec.steps and math.isfinite(last["loss"])
    assert {"loss", "loss_raw", "lr", "steps_per_s", "eta_s"} <= set(last)
    keys = load_file(out["lora"]).keys()
    prefixes = {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")}
    if train_te:
        assert prefixes == ({"lora_te1", "lora_te2"} if model == "tiny-sdxl" else {"lora_te"})
    else:
        assert not prefixes
    if model == "tiny-sd2":
        assert events[-1]["summary"]["prediction_type"] == "v_prediction"


def test_outputs_metadata_and_plot(tmp_path: Path, dataset: Path, make_spec) -> None:
    spec = make_spec(dataset, steps=4, output_name="scs", save_every_n_steps=2, save_precision="fp16")
    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append)
    lora = Path(out["lora"])
    assert lora == tmp_path / "job" / "outputs" / "scs.safetensors"
    sd = load_file(lora)
    assert all(k.startswith("lora_unet_") for k in sd) and any(k.endswith(".alpha") for k in sd)
    assert sd[next(k for k in sd if k.endswith("lora_up.weight"))].dtype == torch.float16
    from trainer.format.kohya import read_kohya

    lf = read_kohya(lora)
    md = lf.metadata
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_dim"] == "4"
    assert md["ss_sd_model_name"] == "tiny-sd15" and md["ss_output_name"] == "scs"
    assert md["ss_learning_rate"] == "0.01" and md["ss_optimizer"] == "AdamW"
    assert out["intermediate"] == [str(tmp_path / "job" / "outputs" / "scs-step00000002.safetensors")]
    png = Image.open(out["plot"])
    assert png.size == (800, 450)
    hist = json.loads(Path(out["loss_history"]).read_text())
    assert hist["steps"] == [1, 2, 3, 4] and len(hist["loss"]) == 4
    files = [(e["kind"], Path(e["path"]).name) for e in events if e["type"] == "file"]
    assert ("lora", "scs-step00000002.safetensors") in files and ("lora", "scs.safetensors") in files
    assert ("plot", "loss.png") in files
    # the defaults are "auto": on CPU they resolve to fp32 without checkpointing, recorded in the file and a log
    assert spec.mixed_precision == "auto" and spec.gradient_checkpointing is None
    assert md["ss_mixed_precision"] == "no" and md["ss_gradient_checkpointing"] == "False"
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("precision fp32 (auto on cpu)" in m and "gradient checkpointing off (auto" in m
               and "attention PyTorch SDPA" in m for m in logs), logs


def test_attention_only_lora_trains_and_says_so(tmp_path: Path, dataset: Path, make_spec) -> None:
    # the module set of diffusers' LoRA examples and LyCORIS' attn-only preset: q/k/v/out of each attention, nothing
    # else of the transformer blocks; the file keeps kohya's names, so every loader applies it
    from trainer.format.kohya import read_kohya

    spec = make_spec(dataset, steps=2, network={"dim": 4, "unet_modules": "attn-only"})
    assert spec.network.unet_modules == "attention"
    lf = read_kohya(Path(train(spec, tmp_path / "attn")["lora"]))
    modules = set(lf.modules)
    assert modules and all(m.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) for m in modules), sorted(modules)
    assert json.loads(lf.metadata["ss_network_args"]) == {"preset": "attn-only"}
    full = read_kohya(Path(train(make_spec(dataset, steps=2, network={"dim": 4}), tmp_path / "full")["lora"]))
    full_modules = set(full.modules)
    # tiny-sd15's transformer blocks: 8 attention projections of kohya's 12 linears per block
    assert modules < full_modules and len(modules) * 3 == len(full_modules) * 2
    assert "preset" not in json.loads(full.metadata["ss_network_args"])


def test_auto_precision_and_checkpointing_resolve_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.train.precision import resolve_gradient_checkpointing, resolve_mixed_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mixed_precision("auto", cpu) == "no"
    for explicit in ("no", "fp16", "bf16"):
        assert resolve_mixed_precision(explicit, cpu) == explicit == resolve_mixed_precision(explicit, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 6))
    assert resolve_mixed_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # e.g. a 20xx card
    assert resolve_mixed_precision("auto", cuda) == "fp16"
    assert resolve_gradient_checkpointing(None, "sdxl", cuda) is True
    assert resolve_gradient_checkpointing(None, "sd1", cuda) is False
    assert resolve_gradient_checkpointing(None, "sd2", cuda) is False
    assert resolve_gradient_checkpointing(None, "sdxl", cpu) is False
    assert resolve_gradient_checkpointing(True, "sd1", cpu) is True
    assert resolve_gradient_checkpointing(False, "sdxl", cuda) is False


# --- optimizers and schedules --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor"])
def test_each_optimizer_trains(tmp_path: Path, module_dataset: Path, make_spec, name: str) -> None:
    lr = 1.0 if name == "Prodigy" else 1e-3
    spec = make_spec(module_dataset, steps=3, network={"dim": 2, "alpha": 1},
                     optimizer={"name": name, "lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.01})
    out = train(spec, tmp_path / "job")
    sd = load_file(out["lora"])
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(u.abs().max()) > 0 for u in ups)  # up starts at zero: it moved
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_8bit_optimizers_use_8bit_state_on_large_tensors() -> None:
    for name in ("AdamW8bit", "Lion8bit"):
        p = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements: above bitsandbytes' min_8bit_size
        opt, _ = build_optimizer(OptimizerSpec(name=name, lr=1e-3), [p])
        before = p.detach().clone()
        p.square().sum().backward()
        opt.step()
        assert not torch.equal(before, p.detach())
        assert opt.state[p]["state1"].dtype == torch.uint8


def test_optimizer_groups_and_errors() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt, _ = build_optimizer(OptimizerSpec(name="AdamW", lr=1e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1),
                             [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}])
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["weight_decay"] == 0.1
    ada, _ = build_optimizer(OptimizerSpec(name="Adafactor", lr=1e-3), [a])
    g = ada.param_groups[0]
    assert g["lr"] == 1e-3 and g["relative_step"] is False and g["scale_parameter"] is False
    _, notes = build_optimizer(OptimizerSpec(name="Prodigy", lr=1e-4), [a])
    assert any("Prodigy" in n for n in notes)
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(JobFailed, match="nothing to train"):
        build_optimizer(OptimizerSpec(), [frozen])
    with pytest.raises(JobFailed, match="betas"):
        build_optimizer(OptimizerSpec(betas=(0.9, 1.5)), [a])


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_schedules_match_diffusers(name: str) -> None:
    spec = OptimizerSpec(lr=1e-3, scheduler=name, warmup_steps=3, num_cycles=2, power=2.0)

    def lrs(make) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1e-3)
        sched = make(opt)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(spec, o, 12)[0])
    kw: dict[str, Any] = {"num_warmup_steps": 3, "num_training_steps": 12}
    if name == "cosine_with_restarts":
        kw["num_cycles"] = 2
    if name == "polynomial":
        kw["power"] = 2.0
    theirs = lrs(lambda o: get_scheduler(resolve_scheduler_name(spec), o, **kw))
    assert ours == pytest.approx(theirs)
    # warmup respected: constant too (diffusers' plain "constant" would ignore it)
    assert ours[0] == 0.0 and ours[1] == pytest.approx(1e-3 / 3) and max(ours) == pytest.approx(1e-3)


# --- loss pieces -------------------------------------------------------------------------------------------

def test_loss_types() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([0.05, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    l2 = per_sample_loss(pred, target, "l2")
    l1 = per_sample_loss(pred, target, "l1")
    hub = per_sample_loss(pred, target, "huber", huber_c=0.1)
    assert l2.tolist() == pytest.approx([0.0025, 9.0]) and l1.tolist() == pytest.approx([0.05, 3.0])
    c = 0.1
    expect = [2 * c * (math.sqrt(x * x + c * c) - c) for x in (0.05, 3.0)]
    assert hub.tolist() == pytest.approx(expect)
    # pseudo-Huber: ~l2 near zero (scaled by 1, since 2c(sqrt(x^2+c^2)-c) ~ x^2), ~2c|x| far away
    assert float(hub[0]) == pytest.approx(float(l2[0]), rel=0.1) and float(hub[1]) < float(l2[1]) / 10


def test_min_snr_weighting() -> None:
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    t = torch.tensor([10, 500, 990])
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w_eps = min_snr_weight(sched.alphas_cumprod, t, 5.0, "epsilon")
    w_v = min_snr_weight(sched.alphas_cumprod, t, 5.0, "v_prediction")
    assert w_eps.tolist() == pytest.approx((torch.clamp(snr, max=5) / snr).tolist())
    assert w_v.tolist() == pytest.approx((torch.clamp(snr, max=5) / (snr + 1)).tolist())
    assert w_eps[0] < 1 and w_eps[2] == pytest.approx(1.0)  # low noise (high SNR) is down-weighted
    per = torch.ones(3)
    plain = weighted_loss(per, t, sched, "epsilon", None, None)
    snr_l = weighted_loss(per, t, sched, "epsilon", 5.0, None)
    assert plain == pytest.approx(1.0) and snr_l == pytest.approx(float(w_eps.mean()))
    # per-sample weights (prior preservation's class images) scale their sample only
    lw = weighted_loss(per, t, sched, "epsilon", None, torch.tensor([1.0, 0.5, 0.0]))
    assert lw == pytest.approx(0.5)


def test_noise_offset_shifts_channels() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = make_noise((2, 4, 8, 8), g1, 0.0)
    off = make_noise((2, 4, 8, 8), g2, 0.1)
    diff = off - plain
    assert torch.equal(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)))
    # the difference is one constant per (sample, channel), of the offset's scale
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert 0 < float(diff[:, :, 0, 0].abs().mean()) < 0.3


# --- how jobs end -------------------------------------------------------------------------------------------

def test_cancel_leaves_a_usable_lora(tmp_path: Path, dataset: Path, make_spec, stop_after) -> None:
    spec = make_spec(dataset, steps=10, output_name="scs")
    s = stop_after(3)
    events = s.events
    with pytest.raises(JobCancelled):
        train(spec, tmp_path / "job", on_event=s.sink, should_stop=s.stop)
    cancelled = events[-1]
    assert cancelled["type"] == "cancelled" and cancelled["step"] == 3
    path = Path(cancelled["outputs"]["lora"])
    assert path.name == "scs-step00000003.safetensors"
    assert not (tmp_path / "job" / "outputs" / "scs.safetensors").exists()  # the final name means finished
    from trainer.format.kohya import read_kohya

    lf = read_kohya(path)
    assert lf.modules and all(k.startswith("lora_unet_") for k in load_file(path))
    assert (tmp_path / "job" / "state").is_dir()

    events.clear()  # a stop before the first step saves nothing and says so
    with pytest.raises(JobCancelled):
        train(spec, tmp_path / "job0", on_event=events.append, should_stop=lambda: True)
    assert events[-1] == {"type": "cancelled", "outputs": {}, "step": 0}
    assert not list((tmp_path / "job0").rglob("*.safetensors"))


def test_nan_loss_aborts_without_files(tmp_path: Path, dataset: Path, make_spec,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = losses_mod.per_sample_loss
    calls = {"n": 0}

    def poisoned(*a: Any, **k: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(losses_mod, "per_sample_loss", poisoned)
    spec = make_spec(dataset, steps=6, state_every_n_steps=1, save_every_n_steps=1)
    with pytest.raises(JobFailed) as e:
        run_job(spec, tmp_path / "job")
    assert e.value.reason == "nan" and "loss became NaN at step 3" in str(e.value)
    assert "lower the learning rate" in str(e.value)
    outs = sorted(p.name for p in (tmp_path / "job" / "outputs").glob("*.safetensors"))
    assert outs == ["lora-step00000001.safetensors", "lora-step00000002.safetensors"]  # nothing after the NaN
    states = sorted(p.name for p in (tmp_path / "job" / "state").iterdir())
    assert states == ["step-00000001", "step-00000002"]
    last = json.loads((tmp_path / "job" / "events.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "failed" and last["reason"] == "nan"


def test_bad_inputs_fail_clearly(tmp_path: Path, dataset_factory, make_spec) -> None:
    events: list[dict[str, Any]] = []
    with pytest.raises(JobFailed) as e:
        run_job(make_spec(tmp_path / "missing"), tmp_path / "j1", on_event=events.append)
    assert e.value.reason == "bad_input" and str(tmp_path / "missing") in str(e.value)
    assert events[-1]["type"] == "failed" and events[-1]["reason"] == "bad_input"

    folder = dataset_factory(tmp_path / "imgs")
    (folder / "zz_fake.png").write_text("not really a png")
    with pytest.raises(JobFailed) as e:
        run_job(make_spec(folder, steps=2), tmp_path / "j2")
    assert e.value.reason == "bad_input" and "zz_fake.png" in str(e.value)
    with pytest.raises(JobFailed) as e:
        run_job(make_spec(folder, steps=2, data={"resolution": 64, "cache_latents": False}), tmp_path / "j3")
    assert "zz_fake.png" in str(e.value)

    with pytest.raises(JobFailed) as e:
        run_job(make_spec(tmp_path / "imgs", base_model="no-such-model"), tmp_path / "j4")
    assert e.value.reason == "bad_input" and "no-such-model" in str(e.value)


def test_runner_records_spec_and_events(tmp_path: Path, dataset: Path, make_spec,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(dataset, steps=2)
    seen: list[dict[str, Any]] = []
    out = run_job(spec, tmp_path / "job", on_event=seen.append)
    from trainer.spec import load_job_file

    assert load_job_file(tmp_path / "job" / "spec.toml") == spec
    logged = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(seen)) and logged[-1]["type"] == "finished"
    assert logged[-1]["outputs"] == out

    def boom(*a: Any, **k: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # a training job frees the preview pipeline the worker keeps between jobs; other job kinds keep it
    import weakref

    class Pipeline:
        pass

    kept = Pipeline()
    ref = weakref.ref(kept)
    context: dict[str, Any] = {"sampler": kept, "sampler_key": ("tiny-sd15", "None", "cpu")}
    del kept
    run_job(spec, tmp_path / "job1", context=context)
    assert "sampler" not in context and "sampler_key" not in context and ref() is None

    monkeypatch.setattr(train_mod, "train", boom)
    seen.clear()
    with pytest.raises(JobFailed) as e:
        run_job(spec, tmp_path / "job2", on_event=seen.append)
    assert e.value.reason == "oom" and "gradient checkpointing" in str(e.value)
    assert seen[-1]["type"] == "failed" and seen[-1]["reason"] == "oom"

    def bug(*a: Any, **k: Any) -> None:
        raise KeyError("x")

    monkeypatch.setattr(train_mod, "train", bug)
    with pytest.raises(JobFailed) as e:
        run_job(spec, tmp_path / "job3")
    assert e.value.reason == "error" and "KeyError" in str(e.value)


def test_cpu_precision_and_checkpointing_paths(tmp_path: Path, dataset: Path, make_spec) -> None:
    """bf16 autocast on CPU, fp16 (trains fp32 on CPU, says so), gradient checkpointing with TE training,
    uncached latents, huber loss (kohya's snr schedule), min-SNR, kohya's noise options (adaptive offset, multires,
    input perturbation, timestep range, zero terminal SNR) and loss weightings, fractional warmup, accumulation:
    every path runs and stays finite."""
    events: list[dict[str, Any]] = []
    spec = make_spec(dataset, steps=2, mixed_precision="bf16", gradient_checkpointing=True, grad_accum=2,
                     network={"train_text_encoder": True, "text_encoder_lr": 5e-3}, loss_type="huber",
                     min_snr_gamma=5.0, noise_offset=0.05, sample={"prompts": [{"prompt": "x"}], "every_n_steps": 2},
                     data={"resolution": 64, "cache_latents": False, "random_flip": True},
                     adaptive_noise_scale=0.01, noise_offset_random_strength=True, multires_noise_iterations=4,
                     ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_timestep=500, max_timestep=1000,
                     zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1,
                     debiased_estimation_loss=True, optimizer={"lr": 1e-3, "warmup_steps": 0.5})
    dtypes: set[torch.dtype] = set()

    def hook(step: int, network: Any) -> list[Path]:
        dtypes.update(p.dtype for p in network.trainable_parameters())
        return []

    out = train(spec, tmp_path / "a", on_event=events.append, sample_hook=hook)
    assert dtypes == {torch.float32}  # bf16 autocast computes in bf16; the LoRA weights themselves stay fp32
    sd = load_file(out["lora"])
    assert any(k.startswith("lora_te_text_model_") for k in sd)
    from trainer.format.kohya import read_kohya

    md = read_kohya(Path(out["lora"])).metadata
    assert md["ss_mixed_precision"] == "bf16" and md["ss_gradient_checkpointing"] == "True"  # explicit values
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_huber_schedule"] == "snr"
    assert md["ss_text_encoder_lr"] == "0.005" and md["ss_lr_warmup_steps"] == "0.5"
    assert all(math.isfinite(e["loss"]) for e in events if e["type"] == "progress" and "loss" in e)
    events.clear()
    train(make_spec(dataset, steps=1, mixed_precision="fp16", loss_type="l1"), tmp_path / "b",
          on_event=events.append)
    assert any(e["type"] == "log" and "fp16" in e["message"] for e in events)


def test_sample_hook_every_n_steps_and_at_end(tmp_path: Path, dataset: Path, make_spec) -> None:
    spec = make_spec(dataset, steps=4, sample={"prompts": [{"prompt": "scs girl"}], "every_n_steps": 2})
    calls: list[int] = []

    def hook(step: int, network: Any) -> list[Path]:
        calls.append(step)
        assert network.trainable_parameters()  # the live network, at its current weights
        p = tmp_path / f"s{step}.png"
        Image.new("RGB", (8, 8)).save(p)  # a real picture: TensorBoard logs each sample as an image
        return [p]

    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append, sample_hook=hook)
    assert calls == [2, 4]
    assert [(e["step"], e["prompt"]) for e in events if e["type"] == "sample"] == [(2, "scs girl"), (4, "scs girl")]
    assert out["samples"] == [str(tmp_path / "s2.png"), str(tmp_path / "s4.png")]


def test_default_samples_render_with_the_sample_module(tmp_path: Path, dataset: Path, make_spec) -> None:
    spec = make_spec(dataset, steps=1, sample={"prompts": [{"prompt": "scs girl", "steps": 2, "width": 64,
                                                            "height": 64}]})
    out = train(spec, tmp_path / "job")
    assert len(out["samples"]) == 1 and Image.open(out["samples"][0]).size == (64, 64)


def test_loss_plot_names_its_curves_with_round_ticks(tmp_path: Path) -> None:
    from trainer.infer.loss_plot import draw_loss_plot, loss_figure

    history = [[s, 0.0123 + 0.0008 * (s % 7) / 7] for s in range(1, 81)]
    ax = loss_figure(history, "x: loss").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss per step",
                                                                    "moving average (25 steps, centred)"]
    assert ax.get_title() == "x: loss" and ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    assert all(float(t).is_integer() for t in ax.get_xticks())  # never a fractional step
    assert all(abs(t * 1e4 - round(t * 1e4)) < 1e-6 for t in ax.get_yticks())  # 0.0124, not 0.012371
    short = loss_figure([[1, 0.5], [2, 0.4], [3, 0.45], [4, 0.3]]).axes[0]
    assert [float(t) for t in short.get_xticks() if 1 <= t <= 4] == [1.0, 2.0, 3.0, 4.0]
    png = draw_loss_plot(history, tmp_path / "out" / "loss.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 450)
