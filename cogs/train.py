"""/train: options (and an optional TOML job file) -> a validated TrainSpec -> the queue.

Order matters: permission check, defer (within Discord's 3 s), download the job file, validate
everything into a spec (invalid -> an ephemeral list of field errors, nothing queued), then queue,
open the job's thread and answer with the queue position and ETA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import InvalidInput
from bot.interactions import (
    download_attachments,
    ensure_deferred,
    list_base_models,
    parse_toml_attachment,
    spec_summary,
    submit_job,
)
from cogs.datasets import dataset_choices, resolve_dataset
from trainer.spec import OPTIMIZERS, SCHEDULERS, deep_merge, list_presets

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


def _options_decorator(fn: Any) -> Any:
    if PRESET_CHOICES:
        fn = app_commands.choices(preset=PRESET_CHOICES)(fn)
    return fn


class Train(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(name="train", description="Train a LoRA on one of your datasets")
    @app_commands.describe(
        dataset="Your dataset (or a shared one)",
        base_model="The model to train on (from the models folder)",
        preset="A known-good recipe; your other options override it",
        trigger_word="Overrides the dataset's trigger word",
        class_prompt="Overrides the dataset's class prompt",
        steps="Training steps",
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
        job_file="A TOML job file for every other setting (the CLI's format)",
    )
    @app_commands.autocomplete(dataset=_dataset_ac, base_model=base_model_choices)
    @app_commands.choices(optimizer=OPTIMIZER_CHOICES, scheduler=SCHEDULER_CHOICES)
    @_options_decorator
    async def train(
        self,
        interaction: discord.Interaction,
        dataset: str,
        base_model: str | None = None,
        preset: str | None = None,
        trigger_word: str | None = None,
        class_prompt: str | None = None,
        steps: app_commands.Range[int, 1, 200_000] | None = None,
        dim: app_commands.Range[int, 1, 1024] | None = None,
        alpha: app_commands.Range[float, 0.0, 4096.0] | None = None,
        conv_dim: app_commands.Range[int, 0, 1024] | None = None,
        conv_alpha: app_commands.Range[float, 0.0, 4096.0] | None = None,
        learning_rate: app_commands.Range[float, 0.0, 10.0] | None = None,
        optimizer: str | None = None,
        scheduler: str | None = None,
        batch_size: app_commands.Range[int, 1, 64] | None = None,
        resolution: app_commands.Range[int, 64, 4096] | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
        train_text_encoder: bool | None = None,
        sample_prompt: str | None = None,
        output_name: str | None = None,
        job_file: discord.Attachment | None = None,
    ) -> None:
        bot = self.bot
        bot.access.require_trainer(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        ds = await resolve_dataset(bot, interaction, dataset)
        file_values: dict[str, Any] = {}
        if job_file is not None:
            files, refused = await download_attachments([job_file], max_bytes=256 * 1024)
            if refused:
                raise InvalidInput(f"`{refused[0][0]}` {refused[0][1]}.")
            file_values = parse_toml_attachment(*files[0])
        options = {
            "base_model": base_model, "steps": steps, "dim": dim, "alpha": alpha, "conv_dim": conv_dim,
            "conv_alpha": conv_alpha, "learning_rate": learning_rate, "optimizer": optimizer,
            "scheduler": scheduler, "batch_size": batch_size, "resolution": resolution, "seed": seed,
            "train_text_encoder": train_text_encoder, "sample_prompt": sample_prompt,
            "output_name": output_name or _default_output_name(ds.name), "trigger_word": trigger_word,
        }
        overrides = build_overrides(options, file_values)
        chosen_preset = preset or file_values.get("preset")
        # Values outside the options' min/max still arrive from non-official clients: the spec
        # validation below is the real check (SpecError names each bad field).
        # Access to the dataset was checked by resolve_dataset (owner, shared or admin).
        spec = await bot.service.build_train_spec(ds.owner_id, ds.id, overrides, chosen_preset)
        if trigger_word is not None or class_prompt is not None:
            words = [(trigger_word if trigger_word is not None else ds.trigger_word).strip(),
                     (class_prompt if class_prompt is not None else ds.class_prompt).strip()]
            for c in spec.concepts:
                c.instance_prompt = " ".join(w for w in words if w)
        await submit_job(interaction, kind="train", spec=spec, title=f"{spec.output_name} on {ds.name}",
                         summary=f"Settings: {spec_summary(spec.model_dump(mode='json'))}")


def _default_output_name(dataset_name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-." else "_" for c in dataset_name).strip("_.-")
    return (cleaned or "lora")[:100]


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Train(bot))
