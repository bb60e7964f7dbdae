"""Token events handed from the scheduler thread to a request's coroutine, taken at most so often.

Every item a replica's stream yields crosses Ray (serialized, sent to the ingress, relayed as one
server-sent event), and all of that runs in the replica's process, under the same interpreter lock
as the scheduler thread. One item per token per stream made that overhead grow with the token
rate: at 32 streams it, not the GPU, set the pace (about 2 of every 3 lock-holding samples in the
replica were Ray's streaming path, not the scheduler). So a stream takes what arrived at most once
every ``min_interval_s`` — the first token goes out at once, later ones in chunks, as Ray Serve LLM
does with its ``stream_batching_interval_ms`` — and the scheduler thread wakes the event loop
once per take, not once per token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class EventBuffer:
    """A one-consumer buffer: ``put`` from any thread, ``take`` from the event loop that created it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, min_interval_s: float = 0.0):
        self._loop = loop
        self._items: deque = deque()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._signalled = False  # a wake-up is scheduled and not yet consumed
        self.min_interval_s = min_interval_s
        self._last_take = float("-inf")

    def put(self, item: Any) -> None:
        """Append ``item``; wake the consumer unless a wake-up is already on its way."""
        self._items.append(item)
        with self._lock:
            if self._signalled:
                return
            self._signalled = True
        self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list:
        """Everything put so far (at least one item), no sooner than ``min_interval_s`` after the last take."""
        while True:
            await self._ready.wait()
            wait = self._last_take + self.min_interval_s - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._ready.clear()
            with self._lock:
                self._signalled = False  # set before draining: an item put after the drain wakes us again
            items = []
            while self._items:
                items.append(self._items.popleft())
            if items:
                self._last_take = self._loop.time()
                return items
