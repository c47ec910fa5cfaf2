"""Difference (copy-machine) pairs: checking the (original, edited target) images, staging them as
one-image datasets, the per-pass specs, and the metadata that says which pair and role a file comes from."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from trainer import atomic
from trainer.data.images import load_image
from trainer.events import JobFailed
from trainer.spec import DifferencePair, TrainSpec

if TYPE_CHECKING:
    from trainer.train.copier_check import CopierCheck


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


def sha256(path: Path) -> str:
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
        o_sha, t_sha = sha256(original), sha256(target)
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


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged: keeps the dataset fingerprint of a resumed pass stable
    atomic.write_bytes(path, data)


def _image_bytes_fitted(path: Path, size: tuple[int, int]) -> bytes:
    """The target resized and centre-cropped to the original's size, as PNG: both then get the same crop."""
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
        _write_if_changed(folder / name, data)
        _write_if_changed(folder / f"{role}.txt", prompt.encode("utf-8"))
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


def role_metadata(role: str, plan: PairPlan, prompt: str, check: CopierCheck | None) -> dict[str, str]:
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


def copier_original(path: Path) -> tuple[str, str] | None:
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
