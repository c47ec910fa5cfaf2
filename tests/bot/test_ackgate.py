"""bot.ackgate: work after a deferral waits while other commands of a burst are still unanswered."""

from __future__ import annotations

import asyncio
import time

from bot.ackgate import AckGate


async def test_work_waits_until_every_arrived_command_is_answered() -> None:
    gate = AckGate(max_wait_s=5)
    for iid in (1, 2, 3):
        gate.arrived(iid)
    gate.answered(1)
    turn = asyncio.create_task(gate.wait_turn())  # command 1 answered; 2 and 3 still wait for theirs
    await asyncio.sleep(0.05)
    assert not turn.done()
    gate.answered(2)
    await asyncio.sleep(0.05)
    assert not turn.done()
    gate.answered(3)
    await asyncio.wait_for(turn, 1)
    assert gate.pending == 0
    t0 = time.monotonic()
    await gate.wait_turn()  # nothing pending: no wait at all
    assert time.monotonic() - t0 < 0.05


async def test_nobody_waits_forever() -> None:
    gate = AckGate(max_wait_s=0.2, stale_s=10)
    gate.arrived(1)  # never answered
    t0 = time.monotonic()
    await gate.wait_turn()
    assert 0.15 < time.monotonic() - t0 < 1.0
    stale = AckGate(max_wait_s=5, stale_s=0.1)
    stale.arrived(7)  # a command that died before answering holds nobody up once stale
    await asyncio.sleep(0.15)
    t0 = time.monotonic()
    await stale.wait_turn()
    assert time.monotonic() - t0 < 0.05 and stale.pending == 0
