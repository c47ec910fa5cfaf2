"""Acknowledge first, then work: a burst of slash commands is acknowledged before any of them does its work.

Discord drops a command that gets no first answer (a deferral or a message) within 3 s. Every command
defers before its real work, but with many commands arriving at once the event loop interleaves one
command's database reads and followup upload with the next command's deferral, so the last deferral
of a burst waits for most of the burst's work. The gate orders it: a command that has been answered
waits (``wait_turn``) while other commands that arrived are still unanswered, then does its work.

Commands register on arrival (the tree's interaction check) and leave on their first answer (or when
they end). An entry older than ``stale_s`` no longer holds anyone up (a command that died without
answering), and nobody waits longer than ``max_wait_s``: under a steady stream of commands work still
makes progress.
"""

from __future__ import annotations

import asyncio
import time


class AckGate:
    def __init__(self, *, max_wait_s: float = 2.0, stale_s: float = 3.0) -> None:
        self.max_wait_s = max_wait_s
        self.stale_s = stale_s
        self._pending: dict[int, float] = {}  # interaction id -> arrival (monotonic)
        self._clear: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._clear is None:  # created lazily, inside the running loop
            self._clear = asyncio.Event()
            self._clear.set()
        return self._clear

    @property
    def pending(self) -> int:
        return len(self._pending)

    def arrived(self, interaction_id: int) -> None:
        self._pending[interaction_id] = time.monotonic()
        self._event().clear()

    def answered(self, interaction_id: int) -> None:
        if self._pending.pop(interaction_id, None) is not None and not self._pending:
            self._event().set()

    def _drop_stale(self) -> None:
        cutoff = time.monotonic() - self.stale_s
        while self._pending:  # oldest first (insertion order): stop at the first fresh one
            iid, t = next(iter(self._pending.items()))
            if t >= cutoff:
                break
            self.answered(iid)

    async def wait_turn(self) -> None:
        """Return when no other command is waiting for its first answer (at most ``max_wait_s``)."""
        self._drop_stale()
        if not self._pending:
            return
        try:
            await asyncio.wait_for(self._event().wait(), self.max_wait_s)
        except TimeoutError:
            self._drop_stale()


def _gate(interaction: object) -> AckGate | None:
    gate = getattr(getattr(interaction, "client", None), "ack_gate", None)
    return gate if isinstance(gate, AckGate) else None


def mark_answered(interaction: object) -> None:
    """The interaction has its first answer (or is over): it no longer holds others up."""
    if (gate := _gate(interaction)) is not None:
        gate.answered(int(getattr(interaction, "id", 0)))


async def wait_turn(interaction: object) -> None:
    """After answering: let the other commands of a burst be answered before this one works."""
    mark_answered(interaction)
    if (gate := _gate(interaction)) is not None:
        await gate.wait_turn()
