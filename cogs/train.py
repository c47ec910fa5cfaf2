"""/train: options (and an optional TOML job file) -> a validated TrainSpec -> the queue.

Order matters: permission check, defer (within Discord's 3 s), download the job file, validate
everything into a spec (invalid -> an ephemeral list of field errors, nothing queued), then queue,
open the job's thread and answer with the queue position and ETA.

``mode:difference`` (copy-machine training, trainer/train/difference.py) takes its image pairs from one of:
- the ``original`` and ``target`` attachments: one pair, named after the original's file name;
- a dataset of pairs, grouped by file name: ``<name>.png`` (or ``<name>-original.png``) is the original
  and ``<name>-target.png`` (also ``-edited``, ``-edit``, ``-after``; ``_`` works like ``-``) the
  edited target; each ``<name>`` is one pair (front, left, right: at most 8);
- a job file's ``[[difference.pairs]]`` with ``original``/``target`` naming images of the chosen dataset
  (file names, never server paths).
Images go through the dataset intake checks, pairs are checked (two distinct images of one size, unless
``resize_pairs``) and only then stored under ``data_dir/inputs/pairs/<sha256>.<ext>`` and queued.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import InvalidInput
from bot.interactions import (
    clip,
    download_attachments,
    ensure_deferred,
    list_base_models,
    read_job_attachment,
    spec_summary,
    submit_job,
)
from bot.lorafile import ARCH_NAMES, base_model_arch
from bot.options import Seed
from bot.plan import submit_plan_line
from bot.specs import (
    OPTIMIZERS,
    SCHEDULERS,
    SpecError,
    TrainSpec,
    deep_merge,
    list_presets,
    preset_values,
    resolve_job,
)
from cogs.datasets import dataset_choices, resolve_dataset
from storage.files import write_bytes_atomic, write_file_atomic
from storage.intake import IntakeError, IntakeLimits, check_image
from storage.names import file_stem

if TYPE_CHECKING:
    from bot.app import LoraforgeBot


def _preset_choices() -> list[app_commands.Choice[str]]:
    try:
        presets = list_presets()
    except Exception:  # noqa: BLE001 - a broken preset file must not stop the bot from loading
        presets = {}
    return [app_commands.Choice(name=f"{k}: {v}"[:100], value=k) for k, v in list(presets.items())[:25]]


PRESET_CHOICES = _preset_choices()
OPTIMIZER_CHOICES = [app_commands.Choice(name=o, value=o) for o in OPTIMIZERS]
SCHEDULER_CHOICES = [app_commands.Choice(name=s, value=s) for s in SCHEDULERS]


async def base_model_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    cur = current.lower().strip()
    out = []
    for name, desc in list_base_models(bot.config.models_dir):
        if cur and cur not in name.lower():
            continue
        out.append(app_commands.Choice(name=f"{name} ({desc})"[:100], value=name[:100]))
        if len(out) == 25:
            break
    return out


async def _dataset_ac(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return await dataset_choices(interaction, current)


def build_overrides(options: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """Spec fields from the slash options, over the job file's values (options win)."""
    o: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = o
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    put("base_model", options.get("base_model"))
    put("steps", options.get("steps"))
    put("network.type", options.get("network_type"))
    put("network.dim", options.get("dim"))
    put("network.alpha", options.get("alpha"))
    put("network.conv_dim", options.get("conv_dim"))
    put("network.conv_alpha", options.get("conv_alpha"))
    put("network.train_text_encoder", options.get("train_text_encoder"))
    put("optimizer.lr", options.get("learning_rate"))
    put("optimizer.name", options.get("optimizer"))
    put("optimizer.scheduler", options.get("scheduler"))
    put("batch_size", options.get("batch_size"))
    put("data.resolution", options.get("resolution"))
    put("seed", options.get("seed"))
    put("output_name", options.get("output_name"))
    if options.get("trigger_word"):
        put("data.trigger_word", options["trigger_word"].strip())
    if options.get("sample_prompt"):
        put("sample.prompts", [{"prompt": options["sample_prompt"].strip()}])
    values = deep_merge(file_values, o)
    values.pop("concepts", None)  # the dataset decides the images; a job file cannot point at paths
    values.pop("kind", None)
    return values


NETWORK_CHOICES = [
    app_commands.Choice(name="LoRA (LoCon with conv_dim)", value="lora"),
    app_commands.Choice(name="LoHa (LyCORIS)", value="loha"),
    app_commands.Choice(name="LoKr (LyCORIS)", value="lokr"),
    app_commands.Choice(name="DoRA (LyCORIS, weight-decomposed LoRA)", value="dora"),
]
MODE_CHOICES = [
    app_commands.Choice(name="standard: learn the dataset's subject or style", value="standard"),
    app_commands.Choice(name="difference (copy-machine): learn only what changed from original to target",
                        value="difference"),
]
MAX_PAIRS = 8  # DifferenceSpec.pairs max_length
# File-name suffixes of a dataset of pairs: "<name>-target.png" is the edit of "<name>.png".
TARGET_SUFFIX = re.compile(r"[-_ ](target|edited|edit|after)$", re.IGNORECASE)
ORIGINAL_SUFFIX = re.compile(r"[-_ ](original|orig|before)$", re.IGNORECASE)
PAIRS_HELP = ("name them `<name>.png` (original) and `<name>-target.png` (the edit), one `<name>` per pair "
              "(e.g. `front.png` + `front-target.png`)")


def _options_decorator(fn: Any) -> Any:
    if PRESET_CHOICES:
        fn = app_commands.choices(preset=PRESET_CHOICES)(fn)
    return fn


# ---------------------------------------------------------------------------------- difference pairs


@dataclass
class PairImage:
    """One checked image of a pair: where its bytes come from and where it will be stored."""

    label: str  # what the user calls it (file name)
    sha256: str
    ext: str
    width: int
    height: int
    data: bytes | None = None  # an attachment's bytes (stored only once the whole request is valid)
    source: Path | None = None  # a dataset image already on disk

    def stored_path(self, root: Path) -> Path:
        return (root / "inputs" / "pairs" / f"{self.sha256}.{self.ext}").resolve()


@dataclass
class PairInput:
    name: str
    original: PairImage
    target: PairImage


def clean_pair_name(text: str, default: str = "pair") -> str:
    """A DifferencePair.name (letters, digits, _ . - and spaces; starts with a letter or digit)."""
    return file_stem(text, default, max_len=60)


def split_pair_stem(file_name: str) -> tuple[str, str]:
    """("front", "target") for "front-target.png"; ("front", "original") for "front.png" or "front_original.jpg".
    Zip entries ("a.zip/dir/front.png") count by their last part."""
    stem = PurePosixPath(file_name.replace("\\", "/")).stem
    if m := TARGET_SUFFIX.search(stem):
        return stem[: m.start()], "target"
    if m := ORIGINAL_SUFFIX.search(stem):
        return stem[: m.start()], "original"
    return stem, "original"


def group_pairs(images: list[Any]) -> list[tuple[str, Any, Any]]:
    """(pair name, original row, target row) from a dataset's images by the naming convention; refuses
    (InvalidInput) incomplete or ambiguous pairs, naming the files."""
    groups: dict[str, dict[str, list[Any]]] = {}
    names: dict[str, str] = {}
    for im in images:
        stem, role = split_pair_stem(im.original_name)
        key = clean_pair_name(stem).lower()
        names.setdefault(key, clean_pair_name(stem))
        groups.setdefault(key, {"original": [], "target": []})[role].append(im)
    problems: list[str] = []
    out: list[tuple[str, Any, Any]] = []
    for key, g in groups.items():
        name = names[key]
        for role in ("original", "target"):
            if len(g[role]) > 1:
                problems.append(f"pair `{name}` has {len(g[role])} {role}s ("
                                + ", ".join(f"`{i.original_name}`" for i in g[role]) + "); keep one")
        if not g["target"]:
            problems.append(f"`{g['original'][0].original_name}` has no target: add `{name}-target.png` "
                            "(the edited image)")
        elif not g["original"]:
            problems.append(f"`{g['target'][0].original_name}` has no original: add `{name}.png`")
        elif len(g["original"]) == 1 and len(g["target"]) == 1:
            out.append((name, g["original"][0], g["target"][0]))
    if problems:
        more = f"\n- ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise InvalidInput("This dataset is not a set of complete pairs:\n"
                           + "\n".join(f"- {p}" for p in problems[:8]) + more,
                           f"For mode:difference {PAIRS_HELP}. Nothing was queued.")
    if len(out) > MAX_PAIRS:
        raise InvalidInput(f"This dataset has {len(out)} pairs; one job takes at most {MAX_PAIRS}.",
                           "Split it into several datasets. Nothing was queued.")
    return sorted(out, key=lambda t: t[0].lower())


def _find_image(images: list[Any], ref: Any, where: str) -> Any:
    """A dataset image named by a job file: its file name (case-insensitive) or the start of its sha256."""
    want = str(ref or "").strip()
    if not want:
        raise InvalidInput(f"{where} is empty.", "Name an image of the dataset (its file name).")
    low = want.lower()
    for im in images:
        if PurePosixPath(im.original_name).name.lower() == low or im.original_name.lower() == low:
            return im
    if re.fullmatch(r"[0-9a-f]{8,64}", low):
        hits = [im for im in images if im.sha256.startswith(low)]
        if len(hits) == 1:
            return hits[0]
    raise InvalidInput(f"{where}: the dataset has no image named `{clip(want, 80)}`.",
                       "Use the file names shown by `/dataset show`. Nothing was queued.")


def pairs_from_job_file(raw: Any, images: list[Any]) -> list[tuple[str, Any, Any]]:
    """[[difference.pairs]] of a job file: original/target are image names in the chosen dataset."""
    if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) for p in raw):
        raise InvalidInput("`difference.pairs` in the job file must be a list of tables "
                           "(`[[difference.pairs]]` with name, original, target).")
    if len(raw) > MAX_PAIRS:
        raise InvalidInput(f"The job file has {len(raw)} pairs; one job takes at most {MAX_PAIRS}.")
    out = []
    for i, p in enumerate(raw, 1):
        unknown = set(p) - {"name", "original", "target"}
        if unknown:
            raise InvalidInput(f"difference.pairs {i}: unknown setting(s) {', '.join(sorted(unknown))}.")
        if not str(p.get("target") or "").strip() or not str(p.get("original") or "").strip():
            missing = "target (the edited image)" if str(p.get("original") or "").strip() else "original"
            raise InvalidInput(f"difference.pairs {i} has only one image: difference training needs two.",
                               f"Add its {missing}. Nothing was queued.")
        name = clean_pair_name(str(p.get("name") or ""), default=f"pair{i}")
        out.append((name, _find_image(images, p["original"], f"difference.pairs {i} original"),
                    _find_image(images, p["target"], f"difference.pairs {i} target")))
    return out


def _row_image(im: Any, files: Any) -> PairImage:
    return PairImage(label=PurePosixPath(im.original_name).name, sha256=im.sha256, ext=im.ext,
                     width=int(im.width), height=int(im.height),
                     source=files.image_path(im.dataset_id, im.sha256, im.ext))


async def attached_pair(original: discord.Attachment | None, target: discord.Attachment | None,
                        limits: IntakeLimits) -> PairInput:
    """The original + target attachments, downloaded now and checked like dataset uploads."""
    if original is None or target is None:
        given, missing = ("original", "target (the edited image)") if original is not None else ("target", "original")
        raise InvalidInput(f"Difference training needs two images, but only the {given} was attached.",
                           f"Attach the {missing} too (options `original` and `target`). Nothing was queued.")
    files, refused = await download_attachments([original, target], max_bytes=limits.max_file_bytes)
    if refused:
        raise InvalidInput(f"`{refused[0][0]}` {refused[0][1]}.", "Nothing was queued.")
    checked: list[PairImage] = []
    for role, (name, data) in zip(("original", "target"), files, strict=True):
        try:
            im = await asyncio.to_thread(check_image, name, data, limits)
        except IntakeError as e:
            raise InvalidInput(f"The {role} image `{clip(e.name, 80)}` {e.reason}.", "Nothing was queued.") from None
        checked.append(PairImage(label=name, sha256=im.sha256, ext=im.ext, width=im.width, height=im.height,
                                 data=im.data))
    stem, _ = split_pair_stem(original.filename)
    return PairInput(clean_pair_name(stem), checked[0], checked[1])


def check_pair_images(pairs: list[PairInput], resize: bool) -> None:
    """Refuse (before anything is stored or queued) pairs the engine would refuse after waiting in the queue."""
    for p in pairs:
        o, t = p.original, p.target
        if o.sha256 == t.sha256:
            raise InvalidInput(f"Pair `{p.name}`: `{o.label}` and `{t.label}` are the same image, so there is no "
                               "difference to learn.", "Give the edited image as the target. Nothing was queued.")
        if (o.width, o.height) != (t.width, t.height) and not resize:
            raise InvalidInput(
                f"Pair `{p.name}`: the original `{o.label}` is {o.width}x{o.height} but the target `{t.label}` is "
                f"{t.width}x{t.height}. The two must have the same size so the same pixels line up.",
                "Export the edit at the original's size, or attach a job file with `[difference]` "
                "`resize_pairs = true` to fit the target to the original. Nothing was queued.")


def store_pair_images(root: Path, pairs: list[PairInput]) -> None:
    """Content-addressed and atomic (temp file + rename): a crash never leaves half an image under a name."""
    for p in pairs:
        for im in (p.original, p.target):
            dest = im.stored_path(root)
            if dest.is_file():
                continue
            if im.data is not None:
                write_bytes_atomic(dest, im.data)
            elif im.source is not None:
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.link(im.source, dest)  # dataset images are immutable (named by hash)
                except OSError:
                    write_file_atomic(dest, im.source)


def default_difference_preset(base_model: str, models_dir: Any) -> str:
    """copy-machine-sdxl for SDXL bases (their copier needs Lion at 5e-5), else copy-machine-sd15."""
    arch = base_model_arch(base_model, models_dir)
    if arch is None:  # unreadable or unknown: go by the name
        arch = "sdxl" if re.search(r"xl", base_model, re.IGNORECASE) else "sd1"
    return "copy-machine-sdxl" if arch == "sdxl" else "copy-machine-sd15"


def is_difference_preset(name: str | None) -> bool:
    if not name:
        return False
    try:
        return preset_values(name).get("mode") == "difference"
    except SpecError:
        return False  # an unknown preset is reported by the spec validation, with the list of known ones


def choose_mode(mode: str | None, preset: str | None, attached: bool, file_values: dict[str, Any]) -> str:
    """standard or difference. Without the option: difference when pair images, a copy-machine preset or a
    job file in difference mode say so; a contradiction with an explicit mode:standard is explained."""
    file_diff = file_values.get("mode") == "difference" or "difference" in file_values
    if mode == "standard":
        if attached:
            raise InvalidInput("`original` and `target` are for mode:difference.",
                               "Choose mode:difference, or leave the two images out to train on a dataset.")
        if is_difference_preset(preset):
            raise InvalidInput(f"`{preset}` is a copy-machine (difference) preset: it needs an original and a "
                               "target image, not a dataset of examples.",
                               "Use mode:difference with `original` and `target`, or pick another preset.")
        if file_diff:
            raise InvalidInput("The job file is a difference (copy-machine) job, but you chose mode:standard.",
                               "Choose mode:difference, or remove `mode`/`[difference]` from the job file.")
        return "standard"
    if mode == "difference" or attached or is_difference_preset(preset) or file_diff:
        return "difference"
    if mode not in (None, ""):
        raise InvalidInput(f"Unknown mode `{clip(str(mode), 40)}`.", "Choose standard or difference.")
    return "standard"


class Train(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(
        name="train",
        description="Train a LoRA on a dataset; mode:difference learns what changed from original to target",
    )
    @app_commands.describe(
        dataset="Your dataset (or a shared one); for mode:difference: pairs like front.png + front-target.png",
        mode="standard, or difference (copy-machine): a LoRA holding only the change from original to target",
        original="mode:difference: the original image (the copier learns to reproduce it)",
        target="mode:difference: the edited image, same size (the LoRA learns only what changed)",
        base_model="The model to train on (from the models folder)",
        preset="A known-good recipe; your other options override it",
        trigger_word="Overrides the dataset's trigger word (difference: the prompt of both passes)",
        class_prompt="Overrides the dataset's class prompt",
        steps="Training steps (difference: per pass)",
        network_type="LoRA (default), or LyCORIS LoHa, LoKr, DoRA (load in A1111 and ComfyUI as they are)",
        dim="LoRA rank (network dim)",
        alpha="LoRA alpha (default: = dim)",
        conv_dim="LoCon rank for conv layers (0: plain LoRA)",
        conv_alpha="LoCon alpha (default: = conv_dim)",
        learning_rate="e.g. 0.0001",
        batch_size="Images per step",
        resolution="Training resolution in pixels (multiple of 8)",
        seed="Random seed (same seed + settings = same result)",
        train_text_encoder="Also train the text encoder",
        sample_prompt="Render this prompt with the LoRA at the end",
        output_name="File name of the LoRA",
        job_file="A TOML job file for every other setting, or a kohya sd-scripts config or command line",
        init_lora="Continue from this LoRA (.safetensors, same base architecture; its rank sets dim)",
    )
    @app_commands.autocomplete(dataset=_dataset_ac, base_model=base_model_choices)
    @app_commands.choices(optimizer=OPTIMIZER_CHOICES, scheduler=SCHEDULER_CHOICES, mode=MODE_CHOICES,
                          network_type=NETWORK_CHOICES)
    @_options_decorator
    async def train(
        self,
        interaction: discord.Interaction,
        dataset: str | None = None,
        mode: str | None = None,
        original: discord.Attachment | None = None,
        target: discord.Attachment | None = None,
        base_model: str | None = None,
        preset: str | None = None,
        trigger_word: str | None = None,
        class_prompt: str | None = None,
        steps: app_commands.Range[int, 1, 200_000] | None = None,
        network_type: str | None = None,
        dim: app_commands.Range[int, 1, 1024] | None = None,
        alpha: app_commands.Range[float, 0.0, 4096.0] | None = None,
        conv_dim: app_commands.Range[int, 0, 1024] | None = None,
        conv_alpha: app_commands.Range[float, 0.0, 4096.0] | None = None,
        learning_rate: app_commands.Range[float, 0.0, 10.0] | None = None,
        optimizer: str | None = None,
        scheduler: str | None = None,
        batch_size: app_commands.Range[int, 1, 64] | None = None,
        resolution: app_commands.Range[int, 64, 4096] | None = None,
        seed: Seed | None = None,
        train_text_encoder: bool | None = None,
        sample_prompt: str | None = None,
        output_name: str | None = None,
        job_file: discord.Attachment | None = None,
        init_lora: discord.Attachment | None = None,
    ) -> None:
        bot = self.bot
        bot.access.require_trainer(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        file_values: dict[str, Any] = {}
        imported = ""  # what a kohya config gave, and what it could not
        if job_file is not None:
            files, refused = await download_attachments([job_file], max_bytes=256 * 1024)
            if refused:
                raise InvalidInput(f"`{refused[0][0]}` {refused[0][1]}.")
            file_values, imported = read_job_attachment(*files[0])
        chosen_preset = preset or file_values.get("preset")
        options = {
            "base_model": base_model, "steps": steps, "network_type": network_type, "dim": dim, "alpha": alpha,
            "conv_dim": conv_dim,
            "conv_alpha": conv_alpha, "learning_rate": learning_rate, "optimizer": optimizer,
            "scheduler": scheduler, "batch_size": batch_size, "resolution": resolution, "seed": seed,
            "train_text_encoder": train_text_encoder, "sample_prompt": sample_prompt,
            "output_name": output_name, "trigger_word": trigger_word,
        }
        attached = original is not None or target is not None
        if choose_mode(mode, chosen_preset, attached, file_values) == "difference":
            if init_lora is not None:
                raise InvalidInput("`init_lora` continues a standard training; a difference job starts from scratch.",
                                   "Leave out `init_lora`, or train in mode:standard.")
            await self._train_difference(interaction, dataset, original, target, options, file_values,
                                         chosen_preset, class_prompt)
            return
        if not dataset:
            raise InvalidInput("Pick a dataset to train on (option `dataset`).",
                               "Or use mode:difference with an `original` and a `target` image.")
        ds = await resolve_dataset(bot, interaction, dataset)
        options["output_name"] = output_name or _default_output_name(ds.name)
        overrides = build_overrides(options, file_values)
        # Values outside the options' min/max still arrive from non-official clients: the spec
        # validation below is the real check (SpecError names each bad field).
        # Access to the dataset was checked by resolve_dataset (owner, shared or admin).
        spec = await bot.service.build_train_spec(ds.owner_id, ds.id, overrides, chosen_preset)
        if trigger_word is not None or class_prompt is not None:
            words = [(trigger_word if trigger_word is not None else ds.trigger_word).strip(),
                     (class_prompt if class_prompt is not None else ds.class_prompt).strip()]
            for c in spec.concepts:
                c.instance_prompt = " ".join(w for w in words if w)
                c.class_prompt = words[1] or None  # the regularization prompt for prior preservation
        await _attach_init_lora(bot, spec, init_lora, dim is not None)
        plan = _memory_plan_line(bot, spec)
        await submit_job(interaction, kind="train", spec=spec, title=f"{spec.output_name} on {ds.name}",
                         summary=f"Settings: {spec_summary(spec.model_dump(mode='json'))}{plan}{imported}")

    async def _train_difference(
        self,
        interaction: discord.Interaction,
        dataset: str | None,
        original: discord.Attachment | None,
        target: discord.Attachment | None,
        options: dict[str, Any],
        file_values: dict[str, Any],
        preset: str | None,
        class_prompt: str | None,
    ) -> None:
        """mode:difference: pairs from the attachments, a dataset of pairs or the job file's pairs."""
        bot = self.bot
        file_diff = file_values.get("difference") or {}
        if not isinstance(file_diff, dict):
            raise InvalidInput("`difference` in the job file must be a table (`[difference]`).")
        file_diff = dict(file_diff)
        file_pairs = file_diff.pop("pairs", None)
        if file_diff.get("copier"):
            # A path on the server: never taken from a user's file (the same rule as concepts.image_dir).
            raise InvalidInput("`difference.copier` (a saved copier file) cannot be set from Discord.",
                               "Remove it from the job file; the copier is trained again. Nothing was queued.")
        file_diff.pop("copier", None)
        resize = bool(file_diff.get("resize_pairs", False))
        attached = original is not None or target is not None
        source = ""
        if attached:
            if dataset or file_pairs:
                raise InvalidInput("Give either `original` + `target` or a dataset of pairs, not both.",
                                   "Nothing was queued.")
            pairs = [await attached_pair(original, target, bot.config.limits.intake_limits())]
            default_name = "difference"
        elif dataset:
            ds = await resolve_dataset(bot, interaction, dataset)
            images = await bot.repo.list_images(ds.id)
            if not images:
                raise InvalidInput(f"Dataset `{ds.name}` has no images.", f"Upload pairs: {PAIRS_HELP}.")
            if len(images) == 1 and not file_pairs:
                raise InvalidInput(f"Dataset `{ds.name}` has a single image; difference training needs two, the "
                                   "original and the edited target.", f"Add the target: {PAIRS_HELP}.")
            groups = pairs_from_job_file(file_pairs, images) if file_pairs else group_pairs(images)
            pairs = [PairInput(n, _row_image(o, bot.files), _row_image(t, bot.files)) for n, o, t in groups]
            default_name = _default_output_name(ds.name)
            source = f" from dataset {ds.name}"
        else:
            if file_pairs:
                raise InvalidInput("The job file's `[[difference.pairs]]` name images of a dataset.",
                                   "Pick that dataset with the `dataset` option. Nothing was queued.")
            raise InvalidInput("Difference training needs two images: the original and the edited target.",
                               f"Attach `original` and `target`, or pick a dataset of pairs ({PAIRS_HELP}).")
        seen: set[str] = set()
        for p in pairs:
            if p.name.lower() in seen:
                raise InvalidInput(f"Two pairs are both named `{p.name}`.", "Give every pair its own name.")
            seen.add(p.name.lower())
        check_pair_images(pairs, resize)

        root = bot.files.root
        base = options.get("base_model") or file_values.get("base_model")
        if not preset:
            preset = await asyncio.to_thread(default_difference_preset, str(base or "tiny-sd15"),
                                             bot.config.models_dir)
        opts = {**options, "trigger_word": None,  # in difference mode the words are the prompt, not a caption tag
                "output_name": options.get("output_name") or default_name}
        values = build_overrides(opts, file_values)
        values["mode"] = "difference"
        diff: dict[str, Any] = {**file_diff, "pairs": [
            {"name": p.name, "original": str(p.original.stored_path(root)), "target": str(p.target.stored_path(root))}
            for p in pairs]}
        words = [w.strip() for w in (options.get("trigger_word"), class_prompt) if w and w.strip()]
        if words:
            diff["prompt"] = " ".join(words)
        values["difference"] = diff
        spec = resolve_job(values, preset)
        if not isinstance(spec, TrainSpec):
            raise InvalidInput("The job file is not a training job.", "Use `/merge` or `/preview` for those.")
        plan = _memory_plan_line(bot, spec)
        await asyncio.to_thread(store_pair_images, root, pairs)  # only now: refusals above store nothing
        names = ", ".join(p.name for p in pairs)
        await submit_job(interaction, kind="train", spec=spec,
                         title=f"{spec.output_name} (difference{source}: {names})",
                         summary=f"Settings: {spec_summary(spec.model_dump(mode='json'))}{plan}")


async def _attach_init_lora(bot: LoraforgeBot, spec: TrainSpec, attachment: discord.Attachment | None,
                            dim_given: bool) -> None:
    """`init_lora:`: the job starts from the attached LoRA, checked here from its header (architecture against
    the base model, rank against dim; the worker checks again with torch) and stored content-addressed. A path in a
    job file names a file on the server, which is not the user's to choose: refused."""
    if attachment is None:
        if spec.init_lora:
            raise InvalidInput("`init_lora` in a job file names a file on the server, which cannot be used here.",
                               "Attach the LoRA with the `init_lora` option instead.")
        return
    from cogs.merge import fetch_attached_loras, save_uploads  # cogs.merge imports this module

    item = (await fetch_attached_loras([attachment]))[0]
    info = item.info
    if info.algos != {"lora"} or spec.network.type != "lora":
        raise InvalidInput(f"`init_lora` continues a plain LoRA/LoCon (`{info.name}` is {info.kind_name}, this job "
                           f"trains network type {spec.network.type}).",
                           "Leave out `init_lora` to start a LyCORIS network from scratch. Nothing was queued.")
    arch = base_model_arch(spec.base_model, bot.config.models_dir)
    if info.arch and arch and info.arch != arch and {info.arch, arch} != {"sd1", "sd2"}:
        raise InvalidInput(f"`{info.name}` is a LoRA for {info.arch_name}, but the base model `{spec.base_model}` is "
                           f"{ARCH_NAMES.get(arch, arch)}.", "Pick a base model of the LoRA's kind. Nothing was queued.")
    if info.rank and info.rank != spec.network.dim:
        if dim_given:
            raise InvalidInput(f"`{info.name}` has rank {info.rank}, but dim is {spec.network.dim}.",
                               f"Use dim:{info.rank} (or leave dim out) to continue from it. Nothing was queued.")
        spec.network.dim = info.rank  # continuing a LoRA: its rank is the job's
    if info.conv_rank and info.conv_rank != spec.network.conv_dim:
        spec.network.conv_dim = info.conv_rank
    if any(m.startswith("lora_te") for m in info.modules):
        spec.network.train_text_encoder = True
    await save_uploads(bot, [item])
    spec.init_lora = str(item.path)


def _memory_plan_line(bot: LoraforgeBot, spec: TrainSpec) -> str:
    """"\n" + the memory plan's summary ("" when the card is unknown); refuses a job that cannot fit the GPU."""
    return submit_plan_line(bot, spec)


def _default_output_name(dataset_name: str) -> str:
    return file_stem(dataset_name.replace(" ", "_"), "lora")


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Train(bot))
