"""Checks the CLI runs before it loads anything: what a job argument is, the folders, the base model, the device and
the memory plan. Each failure is a ``PreflightError`` whose message is one line saying what is wrong and what to use.

Nothing here loads a model or reads an image; the device check imports torch only to ask whether CUDA is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.models.refs import ModelRefError, locate_model, refuse_pickle

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")
KOHYA_HINT = "a kohya config? translate it with `python -m trainer import-kohya FILE`"


class PreflightError(ValueError):
    """A job that cannot start; str() is one line for the user."""


def read_job_text(path: Path) -> str:
    """The text of a job file, or a PreflightError that says what ``path`` is instead."""
    if not path.exists():
        raise PreflightError(f"job file {path} does not exist (to train on a folder of images use --images DIR "
                             "--prompt \"...\")")
    if path.is_dir():
        raise PreflightError(f"{path} is a folder, not a job file: to train on the images in it use "
                             f"`python -m trainer train --images {path} --prompt \"your trigger words\"`")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise PreflightError(f"{path} is an image, not a job file: give the folder that holds the training images "
                             f"with --images {path.parent} --prompt \"...\"")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PreflightError(f"job file {path} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PreflightError(f"{path} is not a text job file (it is binary): a job file is TOML, e.g. "
                             "examples/tiny-sd15.toml; images go in a folder given with --images DIR") from None


def _check_folder(value: str, what: str, option: str) -> None:
    p = Path(value).expanduser()
    if not p.exists():
        raise PreflightError(f"{what} {p} does not exist; {option}")
    if not p.is_dir():
        raise PreflightError(f"{what} {p} is a file, not a folder; {option}")


def check_paths(spec: Any) -> None:
    """The folders and files a train job reads exist and are of the right kind."""
    if getattr(spec, "kind", "train") != "train":
        return
    for c in spec.concepts:
        _check_folder(c.image_dir, "the images folder", "give the folder that holds the images (--images DIR)")
        if c.class_dir and Path(c.class_dir).expanduser().is_file():  # a missing one is created and filled
            raise PreflightError(f"the class images folder {c.class_dir} is a file; give a folder")
    if spec.difference is not None:
        for pair in spec.difference.pairs:
            for label, value in (("original", pair.original), ("target", pair.target)):
                p = Path(value).expanduser()
                if not p.is_file():
                    raise PreflightError(f"difference pair {pair.name!r}: the {label} image {p} "
                                         f"{'is a folder' if p.is_dir() else 'does not exist'}; give an image file")


def check_base(spec: Any, models_dir: Path | None) -> None:
    ref = getattr(spec, "base_model", None)
    if not ref:
        return
    try:
        path = locate_model(str(ref), models_dir)
        if path is not None:
            refuse_pickle(path)
    except ModelRefError as e:
        raise PreflightError(str(e)) from None
    if init := getattr(spec, "init_lora", None):
        from trainer.events import JobFailed
        from trainer.format.kohya import resolve_lora_path

        try:
            resolve_lora_path(init, models_dir)
        except JobFailed as e:
            raise PreflightError(f"init_lora: {e}") from None


def check_device(device: str | None) -> str:
    """The device the job will run on ('cpu', 'cuda:N'); refuses a CUDA device this machine does not have."""
    import torch

    if device in (None, "", "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PreflightError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise PreflightError(f"--device {device}: {why}; use --device cpu (slow) or a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        index = dev.index or 0
        if index >= count:
            raise PreflightError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
        return f"cuda:{index}"
    if dev.type != "cpu":
        raise PreflightError(f"--device {device}: only cpu and cuda devices are supported")
    return "cpu"


def check_memory(spec: Any, device: str, models_dir: Path | None) -> None:
    """On a CUDA device, refuse a train job whose memory plan does not fit the card."""
    if not device.startswith("cuda") or getattr(spec, "kind", "train") != "train":
        return
    import torch

    from trainer.plan import PlanError, plan_job

    card = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        plan = plan_job(spec, card_bytes=card, models_dir=models_dir)
    except PlanError:
        return  # an architecture the plan cannot tell: the loader says what is wrong with the model
    if plan.fits is False:
        raise PreflightError(f"this job would run out of GPU memory on {device}: {plan.message()}")


def preflight(spec: Any, models_dir: Path | None, device: str | None) -> str:
    """Every check, cheapest first; returns the device the job will run on."""
    check_paths(spec)
    check_base(spec, models_dir)
    dev = check_device(device)
    check_memory(spec, dev, models_dir)
    return dev
