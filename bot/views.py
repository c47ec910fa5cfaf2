"""Buttons that keep working after a restart.

The Cancel button is a ``DynamicItem``: its custom id ``job:cancel:<id>`` carries everything needed,
and the bot registers the class once (``bot.add_dynamic_items``), so a click on a message sent by a
previous process still reaches ``callback``, which looks the job up by id.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot.errors import report

if TYPE_CHECKING:
    from bot.app import LoraforgeBot


class CancelButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"job:cancel:(?P<id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", style=discord.ButtonStyle.danger, custom_id=f"job:cancel:{int(job_id)}", emoji="\u2716"
            )
        )
        self.job_id = int(job_id)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> CancelButton:
        return cls(int(match["id"]))

    async def callback(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        from bot.interactions import cancel_job  # late: interactions imports app types

        try:
            text = await cancel_job(interaction, self.job_id)
            bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
            await interaction.response.send_message(text, ephemeral=True)
            bot.progress.nudge(self.job_id)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            await report(interaction, e, f"cancel button for job {self.job_id}")


def job_view(job_id: int) -> discord.ui.View:
    """A view holding the Cancel button, ready to send. It is stopped on purpose: the dynamic item
    registry routes clicks; a stored live view would receive the same click a second time."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    view.stop()
    return view
