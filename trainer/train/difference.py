"""Copy-machine (Difference) training: a LoRA that learns only what changed between two images.

sd-webui-traintrain's Difference mode, per pair (original, target):
- pass 1 trains a "copier" LoRA on the original until the model reproduces it (the spec's own settings);
- the copier check measures the denoising loss on the original at fixed noise and timesteps with and without
  the copier and stops the job when the copier did not learn the image (plus a side-by-side image);
- pass 2 trains a NEW network (`spec.pass2_spec()` settings) on the target with the copier applied at strength
  1.0 and frozen; only that network is saved, so the file holds the difference alone.
Several pairs (front / left / right) give one LoRA each and, with `merge_rank`, their SVD merge.

Each pass is an ordinary `trainer.train.loop` run on a derived single-image spec in its own folder
(`job_dir/difference/<pair>/pass1|pass2`), so the loop's exact resume applies inside a pass, and
`job_dir/difference/progress.json` records finished passes so a restarted job skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from trainer.data.dataset import TrainData, encode_pixels, encode_text, generator, load_image, scan_dataset
from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.spec import DifferencePair, TrainSpec

DIFF_DIR = "difference"
PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 1
COPIER_ADAPTER = "copier"
# The copier check: fixed timesteps spread over the schedule, two noise draws each (deterministic from the seed).
CHECK_TIMESTEPS = (50, 200, 400, 600, 800)
CHECK_DRAWS = 2
# The side-by-side image: a short img2img from the noised original (strength 0.6, DDIM, fixed noise).
RECON_STRENGTH = 0.6
RECON_STEPS = 12


@dataclass
class PairPlan:
    """One validated pair: where its images are and what the passes are called on disk."""

    pair: DifferencePair
    key: str  # file-system name (spaces -> "_")
    original: Path
    target: Path
    size: tuple[int, int]  # (w, h) of the original
    target_resized: bool = False
    original_sha: str = ""
    target_sha: str = ""


@dataclass
class CopierCheck:
    loss_without: float
    loss_with: float
    improvement: float  # (without - with) / without
    required: float
    image: str | None = None

    @property
    def passed(self) -> bool:
        return self.improvement >= self.required


# --- input validation -------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pair_key(name: str) -> str:
    return "_".join(name.split())


def _image_size(path: Path, what: str) -> tuple[int, int]:
    try:
        return load_image(path).size
    except JobFailed as e:
        raise JobFailed(f"{what}: {e}", reason="bad_input") from None


def check_pairs(spec: TrainSpec, resize_pairs: bool = False) -> list[PairPlan]:
    """Every pair has two readable, distinct images of one size (or `resize_pairs`); names are unique.

    Raises JobFailed(reason="bad_input") with a message saying what is wrong and what to do.
    """
    if spec.mode != "difference" or spec.difference is None:
        raise JobFailed("this job is not a difference (copy-machine) job: set mode = 'difference' and give "
                        "[difference] pairs", reason="bad_input")
    plans: list[PairPlan] = []
    seen: dict[str, str] = {}
    for pair in spec.difference.pairs:
        key = pair_key(pair.name)
        if key.lower() in seen:
            raise JobFailed(f"two pairs are named {pair.name!r}; give every pair its own name "
                            "(e.g. front, left, right)", reason="bad_input")
        seen[key.lower()] = pair.name
        label = f"pair {pair.name!r}"
        if not pair.original.strip() or not pair.target.strip():
            which = "target (edited)" if pair.original.strip() else "original"
            raise JobFailed(f"{label} has only one image: difference training needs two, the original and the "
                            f"edited target; add the {which} image", reason="bad_input")
        original, target = Path(pair.original).expanduser(), Path(pair.target).expanduser()
        for role, p in (("original", original), ("target", target)):
            if not p.is_file():
                raise JobFailed(f"{label}: the {role} image {p} was not found; upload it again or fix "
                                f"difference.pairs.{role}", reason="bad_input")
        if original.resolve() == target.resolve():
            raise JobFailed(f"{label} has only one image ({original} is both original and target): give the "
                            "edited image as the target", reason="bad_input")
        o_size = _image_size(original, f"{label}, original image")
        t_size = _image_size(target, f"{label}, target image")
        o_sha, t_sha = _sha256(original), _sha256(target)
        if o_sha == t_sha:
            raise JobFailed(f"{label}: the target is the same image as the original ({original.name} and "
                            f"{target.name} are identical), so there is no difference to learn; give the edited "
                            "image as the target", reason="bad_input")
        if o_size != t_size and not resize_pairs:
            raise JobFailed(
                f"{label}: the original is {o_size[0]}x{o_size[1]} but the target is {t_size[0]}x{t_size[1]}; "
                "the two images must have the same size so the same pixels line up (export the edit at the "
                "original's size, or allow resizing the target with the same crop)", reason="bad_input")
        plans.append(PairPlan(pair, key, original, target, o_size, target_resized=o_size != t_size,
                              original_sha=o_sha, target_sha=t_sha))
    return plans


# --- per-pass folders and specs ---------------------------------------------------------------------

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged: keeps the dataset fingerprint of a resumed pass stable
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _image_bytes_fitted(path: Path, size: tuple[int, int]) -> bytes:
    """The target resized and centre-cropped to the original's size, as PNG: both then get the same crop."""
    import io

    img = ImageOps.fit(load_image(path), size, Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def stage_images(plan: PairPlan, root: Path, prompt: str) -> tuple[Path, Path]:
    """One folder per image (the image + a caption .txt holding the difference prompt)."""
    folders = []
    for role, src in (("original", plan.original), ("target", plan.target)):
        folder = root / "data" / role
        if role == "target" and plan.target_resized:
            name, data = f"{role}.png", _image_bytes_fitted(src, plan.size)
        else:
            name, data = f"{role}{src.suffix.lower()}", src.read_bytes()
        for stale in folder.glob("*") if folder.is_dir() else []:
            if stale.name not in (name, f"{role}.txt"):
                stale.unlink()  # a renamed upload must not leave a second image in the folder
        _atomic_write_bytes(folder / name, data)
        _atomic_write_bytes(folder / f"{role}.txt", prompt.encode("utf-8"))
        folders.append(folder)
    return folders[0], folders[1]


def _derived(values: dict[str, Any], image_dir: Path, prompt: str, output_name: str,
             keep_samples: bool) -> TrainSpec:
    values = dict(values)
    values.pop("difference", None)
    values["mode"] = "standard"
    values["concepts"] = [{"image_dir": str(image_dir), "instance_prompt": prompt, "caption_mode": "caption_only",
                           "repeats": 1}]
    values["output_name"] = output_name
    values["data"] = {**values["data"], "random_flip": False}  # the copier must reproduce the image as it is
    if not keep_samples:
        values["sample"] = {"prompts": []}
        values["save_every_n_steps"] = 0
    return TrainSpec.model_validate(values)


def pass_specs(spec: TrainSpec, plan: PairPlan, original_dir: Path, target_dir: Path) -> tuple[TrainSpec, TrainSpec]:
    """(pass 1 on the original, pass 2 on the target): single-image standard specs."""
    assert spec.difference is not None
    prompt = spec.difference.prompt
    p1 = _derived(spec.model_dump(mode="python"), original_dir, prompt,
                  f"{spec.output_name}-{plan.key}-copier", keep_samples=False)
    p2 = _derived(spec.pass2_spec().model_dump(mode="python"), target_dir, prompt,
                  f"{spec.output_name}-{plan.key}", keep_samples=True)
    return p1, p2


# --- progress file ----------------------------------------------------------------------------------

def _read_progress(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": PROGRESS_VERSION, "pairs": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": PROGRESS_VERSION, "pairs": {}}  # unreadable: redo (each pass still resumes from state)
    if data.get("version") != PROGRESS_VERSION:
        return {"version": PROGRESS_VERSION, "pairs": {}}
    return data


def _write_progress(path: Path, data: dict[str, Any]) -> None:
    _atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


# --- the copier on a base -----------------------------------------------------------------------------

def _apply_copier(base: Any, copier: Path) -> Any:
    from trainer.format.kohya import LoraFileError
    from trainer.network.lora import apply_kohya_file

    # apply_kohya_file's peft injection may draw from the global RNG: keep the training stream untouched
    with torch.random.fork_rng(devices=[]):
        try:
            return apply_kohya_file(base, copier, multiplier=1.0, adapter=COPIER_ADAPTER)
        except LoraFileError as e:
            raise JobFailed(f"the copier {copier} cannot be applied to base model {base.name!r}: {e}",
                            reason="bad_input") from None


def _pass_trainer_class() -> type:
    """A Trainer that applies a frozen copier to the loaded base and adds difference metadata.

    train.py has no base-preparation hook, so this wraps Trainer.setup(): the copier goes on after the base
    is loaded and the new network created, before latents/text are cached and before the first step (the
    order of peft adapters on a layer does not change the sum). The copier is a separate, non-trainable peft
    adapter: it is not in the optimizer and not in network_state(), so neither states nor files contain it.
    """
    from trainer.train.loop import Trainer

    class PassTrainer(Trainer):
        def __init__(self, *args: Any, copier: Path | None = None, extra_metadata: dict[str, str] | None = None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.copier_path = copier
            self.extra_metadata = dict(extra_metadata or {})
            self.copier_net: Any = None

        def setup(self) -> None:
            super().setup()
            if self.copier_path is not None:
                self.copier_net = _apply_copier(self.base, self.copier_path)
                self.log(f"copier {self.copier_path.name} applied at strength 1.0, frozen")

        def metadata(self, step: int) -> dict[str, str]:
            md = super().metadata(step)
            md.update(self.extra_metadata)
            return md

    return PassTrainer


# --- the copier check ---------------------------------------------------------------------------------

def _compute_ctx(base: Any, device: torch.device) -> AbstractContextManager[Any]:
    # A GPU trainer may have cast the frozen base to bf16/fp16: run the check under the same autocast.
    dtype = next(base.unet.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def _decode(vae: Any, latents: torch.Tensor) -> Image.Image:
    p = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents.to(p.device, p.dtype) / vae.config.scaling_factor + shift
    img = vae.decode(x).sample[0].float().clamp(-1, 1)
    arr = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def reconstruct(base: Any, data: TrainData, prediction_type: str, device: torch.device, seed: int,
                strength: float = RECON_STRENGTH, steps: int = RECON_STEPS) -> Image.Image:
    """What the model (with whatever LoRAs are on it) makes of the noised first image: a short DDIM img2img."""
    from diffusers import DDIMScheduler

    from trainer.train.loop import unet_forward

    sched = DDIMScheduler.from_config(base.noise_scheduler.config, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    ts = sched.timesteps[int(round(steps * (1 - strength))):]
    px, crop = data.pixels(0, False)
    lat = encode_pixels(base.vae, px[None]).to(device)
    hidden, pooled = encode_text(base, [data.items[0].caption], device)
    tid = torch.tensor([[*crop.original_size, *crop.crop_top_left, *crop.target_size]], dtype=torch.float32)
    noise = torch.randn(lat.shape, generator=generator(seed, "copier-check", "reconstruct")).to(device)
    x = sched.add_noise(lat, noise, ts[:1])
    for t in ts:
        out = unet_forward(base, x, t.reshape(1).to(device), hidden, pooled, tid)
        x = sched.step(out.float(), t, x).prev_sample
    return _decode(base.vae, x)


def copier_check(base: Any, data: TrainData, copier: Path, prediction_type: str, device: torch.device, seed: int,
                 required: float, image_path: Path, title: str) -> CopierCheck:
    """Loss on the original at fixed noise/timesteps without and with the copier, and the side-by-side PNG.

    `base` must carry no other LoRA; the copier is applied here and removed before returning.
    """
    from trainer.infer.grid import make_grid, save_png
    from trainer.train.loop import eval_denoise_loss

    modes = {id(m): m.training for m in (base.unet, *base.text_encoders)}
    for m in (base.unet, *base.text_encoders):
        m.eval()
    net = None
    try:
        with _compute_ctx(base, device):
            without = eval_denoise_loss(base, data, prediction_type, str(device), seed, CHECK_TIMESTEPS, CHECK_DRAWS)
            img_base = reconstruct(base, data, prediction_type, device, seed)
            net = _apply_copier(base, copier)
            with_ = eval_denoise_loss(base, data, prediction_type, str(device), seed, CHECK_TIMESTEPS, CHECK_DRAWS)
            img_copier = reconstruct(base, data, prediction_type, device, seed)
    finally:
        if net is not None:
            net.remove()
        for m in (base.unet, *base.text_encoders):
            m.train(modes[id(m)])
    improvement = (without - with_) / without if without > 0 else 0.0
    original = data.cropped(0).image
    grid, _ = make_grid([[original, img_base, img_copier]], ["original", "base alone", "with copier"],
                        [f"loss {without:.4f} -> {with_:.4f}"], title=title)
    save_png(grid, image_path)
    return CopierCheck(without, with_, improvement, required, str(image_path))


def not_converged_message(pair: str, check: CopierCheck, spec: TrainSpec, arch: str) -> str:
    opt = spec.optimizer
    tips = [f"train pass 1 longer (steps = {spec.steps}; try {max(spec.steps * 2, 200)})"]
    if arch == "sdxl":
        if opt.lr > 5e-5 or opt.name not in ("Lion", "Lion8bit"):
            tips.append(f"for SDXL use a lower learning rate: Lion at 5e-5 (now {opt.name} {opt.lr:g})")
        if spec.network.dim < 16 or spec.network.conv_dim < 8:
            tips.append("a bigger copier: network dim 16 / alpha 16, conv_dim 8 / conv_alpha 8")
        tips.append("or start from the copy-machine-sdxl preset")
    else:
        if opt.lr > 1e-4:
            tips.append(f"a lower learning rate (now {opt.lr:g}; try 1e-4)")
        elif opt.lr < 2e-5:
            tips.append(f"a higher learning rate (now {opt.lr:g}; try 1e-4)")
        if spec.network.dim < 16:
            tips.append("a bigger copier: network dim 16 / alpha 16, conv_dim 8 / conv_alpha 8")
        tips.append("or start from the copy-machine-sd15 preset")
    return (f"pair {pair!r}: the copier did not learn the original image, so the difference LoRA would be blurry. "
            f"Denoising loss on the original: {check.loss_without:.4f} without the copier, {check.loss_with:.4f} "
            f"with it ({check.improvement:.0%} lower; at least {check.required:.0%} is needed, "
            f"difference.copier_min_improvement). Try: " + "; ".join(tips) + ".")


# --- events -------------------------------------------------------------------------------------------

def _pass_sink(on_event: EventSink, pair: str, pass_no: int, label: str, done_before: int,
               total_all: int) -> EventSink:
    """Forward a pass's events as part of the whole job: pair/pass fields, overall progress, one start/finish."""

    def sink(e: dict[str, Any]) -> None:
        t = e.get("type")
        if t in ("started", "finished"):
            return  # the difference job reports one of each
        if t == "file" and e.get("kind") == "lora":
            return  # the pass's own file lives in its folder; the job announces the files users get
        e = {**e, "pair": pair, "pass": pass_no}
        if t == "phase":
            e["name"] = label if e.get("name") == "training" else f"{label}: {e.get('name')}"
        elif t == "progress":
            e["overall_step"] = done_before + int(e.get("step", 0))
            e["overall_total"] = total_all
        on_event(e)

    return sink


# --- the job ------------------------------------------------------------------------------------------

def _copy_atomic(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _role_metadata(role: str, plan: PairPlan, prompt: str, check: CopierCheck | None) -> dict[str, str]:
    info: dict[str, Any] = {"role": role, "pair": plan.pair.name, "original": plan.original.name,
                            "target": plan.target.name, "prompt": prompt, "original_sha256": plan.original_sha}
    if check is not None:
        info["copier_loss"] = {"without": round(check.loss_without, 6), "with": round(check.loss_with, 6)}
    if role == "difference":
        comment = (f"loraforge copy-machine (difference) LoRA, pair {plan.pair.name}: holds only what changed from "
                   f"{plan.original.name} to {plan.target.name}; use it without the copier")
    else:
        comment = f"loraforge copy-machine copier for pair {plan.pair.name}: reproduces {plan.original.name}"
    return {"loraforge_mode": "difference", "loraforge_difference": json.dumps(info),
            "ss_training_comment": comment, "modelspec.description": comment}


def _copier_original(path: Path) -> tuple[str, str] | None:
    """(sha256, file name) of the original a loraforge copier was trained on, from its metadata; None for a
    copier from another tool (then only the copier check can tell whether it fits)."""
    from trainer.format.kohya import LoraFileError, read_metadata

    try:
        info = json.loads(read_metadata(path).get("loraforge_difference") or "{}")
    except (OSError, LoraFileError, json.JSONDecodeError):
        return None  # a broken file is reported where the copier is applied
    if not isinstance(info, dict) or info.get("role") != "copier" or not info.get("original_sha256"):
        return None
    return str(info["original_sha256"]), str(info.get("original") or "another image")


def _base_for_check(spec: TrainSpec, models_dir: Path | None, device: torch.device) -> Any:
    from trainer.models.base import ModelError
    from trainer.models.load import load_base

    dtype = torch.float32
    if device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.mixed_precision, torch.float32)
    try:
        return load_base(spec.base_model, models_dir, dtype=dtype).to(device)
    except ModelError as e:
        raise JobFailed(str(e), reason="bad_input") from None


def train_difference(spec: TrainSpec, job_dir: Path, on_event: EventSink = null_sink,
                     should_stop: StopCheck = never_stop, models_dir: Path | None = None,
                     device: str | None = None, resize_pairs: bool | None = None,
                     context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a copy-machine job; returns outputs (kind -> path or paths). Raises JobFailed / JobCancelled.

    Outputs: "lora" (the pass-2 LoRA, a list with several pairs), "loras" {pair: path}, "copier" (with
    save_copier), "merged" (several pairs and merge_rank), "image" (copier-check pictures), "plot" (loss curves).
    `resize_pairs` lets pairs of different sizes through (the target is fitted to the original's size, then
    both take the same crop); None reads `spec.difference.resize_pairs` when the spec has that field.
    Calling it again with the same job_dir resumes: finished passes are skipped, an unfinished pass continues
    from its last state.
    """
    from trainer.train.loop import resolve_device
    from trainer.train.state import spec_fingerprint

    del context  # accepted like train(); nothing to share across jobs yet
    job_dir = Path(job_dir)
    if resize_pairs is None:
        resize_pairs = bool(getattr(spec.difference, "resize_pairs", False))
    plans = check_pairs(spec, resize_pairs)
    assert spec.difference is not None
    diff = spec.difference
    dev = resolve_device(device)
    out_dir = job_dir / "outputs"
    root = job_dir / DIFF_DIR
    progress_path = root / PROGRESS_FILE
    progress = _read_progress(progress_path)
    reused = Path(diff.copier).expanduser() if diff.copier else None
    if reused is not None:
        if not reused.is_file():
            raise JobFailed(f"the copier to reuse, {reused}, was not found; upload it again or fix "
                            "difference.copier", reason="bad_input")
        if len({p.original_sha for p in plans}) > 1:
            raise JobFailed("difference.copier reuses one copier, which fits one original image, but these pairs "
                            "have different originals; run them as separate jobs or drop difference.copier",
                            reason="bad_input")
        made_from = _copier_original(reused)
        if made_from and made_from[0] != plans[0].original_sha:
            raise JobFailed(f"the saved copier {reused.name} was trained on {made_from[1]}, not on this job's "
                            f"original {plans[0].original.name}; a copier only reproduces its own original. Give "
                            "the copier made from this original, or leave difference.copier empty to train a new "
                            "one", reason="bad_input")

    staged = {p.key: stage_images(p, root / p.key, diff.prompt) for p in plans}
    specs = {p.key: pass_specs(spec, p, *staged[p.key]) for p in plans}
    p1_total = 0 if reused else sum(s[0].steps for s in specs.values())
    total = p1_total + sum(s[1].steps for s in specs.values())

    reused_sha = _sha256(reused) if reused is not None else ""

    def copier_fp(p: PairPlan, s1: TrainSpec) -> str:
        # what the copier depends on: its settings and the original, or the reused file and the original
        if reused is not None:
            return f"reused:{reused_sha}:{p.original_sha}"
        return f"{spec_fingerprint(s1)}:{p.original_sha}"

    def record(key: str) -> dict[str, Any]:
        return progress["pairs"].setdefault(key, {})

    def finished(rec: dict[str, Any] | None, fp: str, path_key: str) -> bool:
        if not rec or not rec.get("done"):
            return False
        if rec.get("fp") != fp:
            raise JobFailed(f"the saved progress in {root} belongs to different settings or images; resume with "
                            "the original settings, or start over with a new job", reason="bad_state")
        return Path(rec.get(path_key, "")).is_file()

    done_steps = 0
    for p in plans:
        s1, s2 = specs[p.key]
        rec = progress["pairs"].get(p.key, {})
        fp1 = f"{spec_fingerprint(s1)}:{p.original_sha}"
        fp2 = f"{spec_fingerprint(s2)}:{p.target_sha}:{copier_fp(p, s1)}"
        if not reused and finished(rec.get("pass1"), fp1, "copier"):
            done_steps += s1.steps
        if finished(rec.get("pass2"), fp2, "lora"):
            done_steps += s2.steps
    on_event(event("started", kind="train", mode="difference", total_steps=total, resumed_from=done_steps,
                   pairs=[p.pair.name for p in plans]))
    if spec.data.random_flip:
        on_event(event("log", level="warning", message="data.random_flip is ignored in difference mode: the copier "
                       "must reproduce the original as it is"))

    outputs: dict[str, Any] = {"loras": {}, "image": [], "plot": []}
    summary: dict[str, Any] = {"pairs": {}}
    copiers: list[str] = []
    trainer_cls = _pass_trainer_class()
    offset = 0
    for idx, p in enumerate(plans):
        s1, s2 = specs[p.key]
        rec = record(p.key)
        fp1 = f"{spec_fingerprint(s1)}:{p.original_sha}"
        name = p.pair.name
        pair_info = {"pair": name, "pair_index": idx + 1, "pairs": len(plans)}
        pair_summary: dict[str, Any] = {}

        # pass 1: the copier
        label1 = f"pair {name}: pass 1 of 2 (copier)"
        check_base = None
        data1 = TrainData.from_spec(s1, scan_dataset(s1))
        if reused is not None:
            copier_path = reused
            on_event(event("phase", name=f"pair {name}: pass 1 of 2 (copier reused from {reused.name})",
                           **pair_info, **{"pass": 1}))
            on_event(event("log", level="info", message=f"pair {name}: reusing the copier {reused.name}; pass 1 "
                           "skipped (the copier check still runs)", pair=name))
        elif finished(rec.get("pass1"), fp1, "copier"):
            copier_path = Path(rec["pass1"]["copier"])
            offset += s1.steps
            on_event(event("log", level="info", message=f"pair {name}: pass 1 already finished, copier kept",
                           pair=name))
        else:
            on_event(event("phase", name=label1, **pair_info, **{"pass": 1}))
            tr = trainer_cls(s1, root / p.key / "pass1", _pass_sink(on_event, name, 1, label1, offset, total),
                             should_stop, models_dir, device,
                             extra_metadata=_role_metadata("copier", p, diff.prompt, None))
            res = tr.run()
            copier_path = Path(res["lora"])
            if res.get("plot"):
                outputs["plot"].append(res["plot"])
            rec["pass1"] = {"done": True, "fp": fp1, "copier": str(copier_path)}
            _write_progress(progress_path, progress)
            offset += s1.steps
            # reuse the loaded base for the check, without the trained network on it
            tr.network.remove()
            check_base = tr.base
            del tr
        fp2_extra = copier_fp(p, s1)
        fp2 = f"{spec_fingerprint(s2)}:{p.target_sha}:{fp2_extra}"

        # the copier check
        chk_rec = rec.get("check")
        if chk_rec and chk_rec.get("copier_fp") == fp2_extra and Path(chk_rec.get("image") or "").is_file():
            check = CopierCheck(**{k: chk_rec[k] for k in ("loss_without", "loss_with", "improvement", "required",
                                                            "image")})
            check.required = diff.copier_min_improvement
        else:
            if should_stop():
                on_event(event("cancelled", outputs={}, pair=name, **{"pass": 1}))
                raise JobCancelled(f"stopped before the copier check of pair {name}")
            on_event(event("phase", name=f"pair {name}: checking the copier", **pair_info, **{"pass": 1}))
            if check_base is None:
                check_base = _base_for_check(s1, models_dir, dev)
            pt = s1.prediction_type if s1.prediction_type != "auto" else check_base.prediction_type
            check = copier_check(check_base, data1, copier_path, pt, dev, s1.seed, diff.copier_min_improvement,
                                 out_dir / f"{spec.output_name}-{p.key}-copier-check.png",
                                 f"pair {name}: copier check")
            arch = check_base.arch
            del check_base
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if check.passed:  # a failed check is redone on a retry (it may run with other settings)
                rec["check"] = {**asdict(check), "copier_fp": fp2_extra}
                _write_progress(progress_path, progress)
            on_event(event("file", kind="image", path=check.image, pair=name, **{"pass": 1},
                           phase="copier check", loss_without=check.loss_without, loss_with=check.loss_with,
                           improvement=check.improvement))
            if not check.passed:
                if reused is not None:  # not a training problem: a copier only knows its own original
                    raise JobFailed(
                        f"pair {name!r}: the saved copier {reused.name} does not reproduce this pair's original "
                        f"(denoising loss {check.loss_without:.4f} without it, {check.loss_with:.4f} with it). A "
                        "copier only works for the original image it was trained on: give the copier made from "
                        f"{Path(p.original).name}, or leave difference.copier empty to train a new one.",
                        reason="copier_not_converged")
                raise JobFailed(not_converged_message(name, check, s1, arch), reason="copier_not_converged")
        outputs["image"].append(check.image)
        on_event(event("log", level="info", pair=name, message=(
            f"pair {name}: copier check passed, denoising loss on the original {check.loss_without:.4f} -> "
            f"{check.loss_with:.4f} ({check.improvement:.0%} lower)")))
        pair_summary["copier_check"] = asdict(check)

        if diff.save_copier and reused is None:
            dest = out_dir / f"{spec.output_name}-{p.key}-copier.safetensors"
            if not dest.is_file() or dest.stat().st_size != copier_path.stat().st_size:
                _copy_atomic(copier_path, dest)
            copiers.append(str(dest))
            on_event(event("file", kind="lora", path=str(dest), pair=name, role="copier"))

        # pass 2: the difference, on top of the frozen copier
        final = out_dir / f"{spec.output_name}-{p.key}.safetensors"
        if finished(rec.get("pass2"), fp2, "lora") and final.is_file():
            on_event(event("log", level="info", message=f"pair {name}: pass 2 already finished", pair=name))
        else:
            label2 = f"pair {name}: pass 2 of 2 (difference)"
            on_event(event("phase", name=label2, **pair_info, **{"pass": 2}))
            tr = trainer_cls(s2, root / p.key / "pass2", _pass_sink(on_event, name, 2, label2, offset, total),
                             should_stop, models_dir, device, copier=copier_path,
                             extra_metadata=_role_metadata("difference", p, diff.prompt, check))
            res = tr.run()
            pair_summary["final_loss"] = (sum(v for _, v in tr.loss_history[-25:]) / len(tr.loss_history[-25:])
                                          if tr.loss_history else None)
            del tr
            if res.get("plot"):
                outputs["plot"].append(res["plot"])
            for k in ("samples",):
                if res.get(k):
                    outputs.setdefault(k, []).extend(res[k])
            _copy_atomic(Path(res["lora"]), final)
            rec["pass2"] = {"done": True, "fp": fp2, "lora": str(final)}
            _write_progress(progress_path, progress)
        offset += s2.steps
        outputs["loras"][name] = str(final)
        on_event(event("file", kind="lora", path=str(final), pair=name, role="difference"))
        summary["pairs"][name] = pair_summary

    loras = list(outputs["loras"].values())
    if diff.merge_rank:
        if len(loras) < 2:
            on_event(event("log", level="warning", message="merge_rank is set but there is only one pair: "
                           "nothing to merge"))
        else:
            try:
                outputs["merged"] = str(_merge(spec, loras, out_dir, on_event, should_stop))
            except JobCancelled:
                on_event(event("cancelled", outputs={"lora": loras, "loras": dict(outputs["loras"])}))
                raise
    outputs["lora"] = loras[0] if len(loras) == 1 else loras
    if copiers:
        outputs["copier"] = copiers[0] if len(copiers) == 1 else copiers
    for k in ("image", "plot"):
        if not outputs[k]:
            del outputs[k]
    summary.update({"steps": total, "resumed_from": done_steps, "mode": "difference"})
    on_event(event("finished", outputs=outputs, summary=summary))
    return outputs


def _merge(spec: TrainSpec, loras: list[str], out_dir: Path, on_event: EventSink, should_stop: StopCheck) -> Path:
    from trainer.jobs.merge import MergeError, svd_merge_to_file

    assert spec.difference is not None
    diff = spec.difference
    dest = out_dir / f"{spec.output_name}-merged.safetensors"
    on_event(event("phase", name=f"merging {len(loras)} pair LoRAs (SVD, rank {diff.merge_rank})"))
    try:
        svd_merge_to_file([(p, diff.merge_ratio) for p in loras], dest, rank=diff.merge_rank,
                          conv_rank=diff.merge_rank, output_name=f"{spec.output_name}-merged",
                          should_stop=should_stop)
    except MergeError as e:
        raise JobFailed(f"the pair LoRAs could not be merged: {e}", reason="bad_input") from None
    on_event(event("file", kind="lora", path=str(dest), role="merged"))
    return dest


__all__ = ["CopierCheck", "PairPlan", "check_pairs", "copier_check", "pass_specs", "train_difference"]
