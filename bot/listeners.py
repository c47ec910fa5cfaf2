"""Scheduler listeners: every job event fanned out to whoever watches (the progress hub, tests).

A sync listener is called inline; an async one runs on its own queue, in order, so a slow one never
holds up the rest. A listener's exceptions are logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.repo import Job

log = logging.getLogger("bot.scheduler")

Event = dict[str, Any]
Listener = Callable[["Job", Event], Any]  # sync or async; its exceptions are logged, never raised


class _AsyncListener:
    """Runs one async listener on its own queue: in order, and a slow one never holds up the rest."""

    def __init__(self, fn: Listener) -> None:
        self.fn = fn
        self.queue: asyncio.Queue[tuple[Job, Event] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def put(self, job: Job, ev: Event) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"listener-{getattr(self.fn, '__name__', '?')}")
        self.queue.put_nowait((job, ev))

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if item is None:
                    return
                await self.fn(*item)
            except Exception:  # noqa: BLE001 - isolation: one listener cannot break the others
                log.exception("listener %r failed", self.fn)
            finally:
                self.queue.task_done()

    async def close(self, timeout: float = 5.0) -> None:
        if self.task is None:
            return
        self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.task.cancel()


class Listeners:
    """The set of listeners of one scheduler."""

    def __init__(self) -> None:
        self._sync: list[Listener] = []
        self._async: list[_AsyncListener] = []

    def add(self, fn: Listener) -> Callable[[], None]:
        """Returns a function that removes ``fn``."""
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            al = _AsyncListener(fn)
            self._async.append(al)

            def remove() -> None:
                with contextlib.suppress(ValueError):
                    self._async.remove(al)
                if al.task is not None:
                    al.queue.put_nowait(None)
        else:
            self._sync.append(fn)

            def remove() -> None:
                with contextlib.suppress(ValueError):
                    self._sync.remove(fn)

        return remove

    def fan_out(self, job: Job, ev: Event) -> None:
        for fn in list(self._sync):
            try:
                res = fn(job, ev)
                if inspect.isawaitable(res):  # a sync callable that returned a coroutine anyway
                    t = asyncio.ensure_future(res)
                    t.add_done_callback(lambda t: t.cancelled() or t.exception())
            except Exception:  # noqa: BLE001 - isolation
                log.exception("listener %r failed", fn)
        for al in list(self._async):
            al.put(job, ev)

    async def close(self) -> None:
        """Drain the async listeners; they stay registered and start afresh on the next event."""
        for al in self._async:
            await al.close()
        self._async = [_AsyncListener(al.fn) for al in self._async]
