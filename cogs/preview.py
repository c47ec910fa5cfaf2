"""/preview: render a prompt with a LoRA (attached, or one of the user's own) on a base model.

One strength and one seed give one image; lists of strengths and/or seeds give a labelled
strength x seed grid. The LoRA's header is checked before anything is queued (``cogs.merge``
helpers); the worker keeps the base model loaded between previews.

Loading this cog also starts the automatic check grid after every successful /train
(``bot.autogrid``): the strength x seed grid of the new LoRA is posted into the job's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.autogrid import AutoGrid
from bot.cooldowns import expensive_cooldown
from bot.errors import InvalidInput
from bot.interactions import clip, ensure_deferred, submit_job
from bot.options import MAX_SEEDS, MAX_STRENGTHS, Guidance, ImageSide, SampleSteps, Seed, Strength, bounds
from bot.specs import SAMPLERS, resolve_job
from cogs.merge import (
    LoraInput,
    check_inputs,
    choose_base_model,
    clean_name,
    fetch_attached_loras,
    own_lora_choices,
    parse_float_list,
    parse_int_list,
    resolve_own_lora,
    save_uploads,
)
from cogs.train import base_model_choices

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

SAMPLER_CHOICES = [app_commands.Choice(name=s, value=s) for s in SAMPLERS]


class Preview(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot
        self.autogrid = AutoGrid(bot)
        self._remove_listener: Callable[[], None] | None = None

    async def cog_load(self) -> None:
        # The scheduler exists once the service is open (setup_hook opens it before loading cogs).
        self._remove_listener = self.bot.scheduler.add_listener(self.autogrid.on_event)

    async def cog_unload(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None

    @app_commands.command(name="preview", description="Render a prompt with a LoRA: one image, or a strength x seed grid")
    @app_commands.describe(
        prompt="What to render, e.g. chibi scs girl",
        lora="A kohya LoRA (.safetensors)",
        mine="Or one of your trained LoRAs",
        strength="LoRA strength for one image (default 1)",
        strengths="Several strengths for a grid, e.g. -1,0,0.5,1,1.5,2",
        seeds="Seeds, e.g. 1111,2222,3333 (default 1111)",
        negative_prompt="What to avoid",
        sampler="Sampler (default euler_a)",
        steps="Sampling steps (default 20)",
        cfg="Guidance scale (default 7)",
        width="Width in pixels (multiple of 8; default: the model's size)",
        height="Height in pixels (multiple of 8; default: the model's size)",
        base_model="Base model (default: the one the LoRA was trained on)",
    )
    @app_commands.autocomplete(mine=own_lora_choices, base_model=base_model_choices)
    @app_commands.choices(sampler=SAMPLER_CHOICES)
    @expensive_cooldown
    async def preview(
        self,
        interaction: discord.Interaction,
        prompt: str,
        lora: discord.Attachment | None = None,
        mine: str | None = None,
        strength: Strength | None = None,
        strengths: str | None = None,
        seeds: str | None = None,
        negative_prompt: str | None = None,
        sampler: str | None = None,
        steps: SampleSteps | None = None,
        cfg: Guidance | None = None,
        width: ImageSide | None = None,
        height: ImageSide | None = None,
        base_model: str | None = None,
    ) -> None:
        bot = self.bot
        bot.access.require_trainer(interaction)
        if lora is not None and mine:
            raise InvalidInput("Give one LoRA: either `lora` (a file) or `mine` (one of yours), not both.")
        if strength is not None and strengths:
            raise InvalidInput("Give `strength` (one image) or `strengths` (a grid), not both.")
        prompt = prompt.strip()
        if not prompt:
            raise InvalidInput("`prompt` is empty.", "Say what to render, e.g. `chibi scs girl`.")
        await ensure_deferred(interaction, ephemeral=True)
        inputs: list[LoraInput] = await fetch_attached_loras([lora])
        if mine:
            inputs.append(await resolve_own_lora(bot, interaction, mine))
        arch = check_inputs(inputs) if inputs else None
        base, note = await choose_base_model(bot, interaction, base_model, inputs, arch)
        if not base:
            raise InvalidInput("Which base model? The LoRA does not say what it was trained on.",
                               "Give `base_model` (see `/models`).")
        strength_list = ([float(strength)] if strength is not None else
                         parse_float_list(strengths, "strengths", *bounds(Strength), max_n=MAX_STRENGTHS)
                         if strengths else [1.0])
        seed_list = parse_int_list(seeds, "seeds", *bounds(Seed), max_n=MAX_SEEDS) if seeds else [1111]
        grid: dict[str, Any] = {"prompt": prompt, "strengths": strength_list, "seeds": seed_list}
        optional = {"negative_prompt": (negative_prompt or "").strip() or None, "sampler": sampler, "steps": steps,
                    "cfg": cfg, "width": width, "height": height}
        grid.update({k: v for k, v in optional.items() if v is not None})
        name = clean_name(prompt, "preview")[:40]

        def build() -> Any:
            # Values outside the options' ranges still arrive from other clients: the spec checks them again.
            return resolve_job({
                "kind": "preview", "base_model": base, "grid": grid, "output_name": name,
                "loras": [{"path": str(i.path or i.info.name), "strength": 1.0} for i in inputs],
            })

        build()  # checked before an upload is written to disk
        await save_uploads(bot, inputs)
        spec = build()
        cells = len(strength_list) * len(seed_list)
        what = "one image" if cells == 1 else f"a {len(strength_list)} x {len(seed_list)} grid (strength x seed)"
        lines = [f"Rendering {what} of *{clip(prompt, 100)}* on `{base}`"
                 + (f" with {inputs[0].label}." if inputs else " without a LoRA.")]
        if note:
            lines.append(note)
        await submit_job(interaction, kind="preview", spec=spec, title=f"preview: {clip(prompt, 60)}",
                         summary="\n".join(lines))


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Preview(bot))
