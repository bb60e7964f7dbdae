"""CUDA graphs of a forward's few shapes: each captured once (at warm-up or on first use) and replayed.

A shape is a hashable key (``RowKVCache`` uses ``(kind, rows, tokens, columns, with_slots)``) whose
inputs and outputs live in static buffers the forward reads and writes; replaying the graph
re-runs the forward on whatever the buffers then hold. A failed capture turns graphs off for good
(``error`` says why) and the forward runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)


class ShapeGraphs:
    """At most ``max_graphs`` captured graphs of ``forward``, the least recently replayed dropped first."""

    def __init__(self, forward: Callable[[Any], None], *, enabled: bool, max_graphs: int = 256):
        self.forward = forward
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.captures = 0
        self.error: str | None = None  # why graphs were turned off, if a capture failed
        self._graphs: OrderedDict[Hashable, Any] = OrderedDict()  # shape -> torch.cuda.CUDAGraph
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def shapes(self) -> list[Hashable]:
        return list(self._graphs)

    def run(self, shape: Hashable) -> None:
        """``forward(shape)`` over the inputs already in its buffers: a replay where graphs are on."""
        if not self.enabled:
            self.forward(shape)
            return
        graph = self._graphs.get(shape)
        if graph is None:
            graph = self._capture(shape)
            if graph is None:  # capture failed: eager from now on
                self.forward(shape)
                return
        self._graphs.move_to_end(shape)
        graph.replay()

    def clear(self) -> None:
        """Drop every graph (their buffers are about to be replaced)."""
        if self._graphs:
            self._graphs.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hands back their pool (freed with its last graph, not released)

    def _capture(self, shape: Hashable):
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if not self._graphs:
            # A fresh pool once no graph is left: the caching allocator frees a pool when its last graph
            # goes, and capturing into that freed pool fails its use-count assertion
            # (CUDACachingAllocator.cpp "it->second->use_count > 0", torch 2.11 on the GPU machine).
            self._pool = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a warm-up run (it writes what the replay writes again)
                self.forward(shape)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # capture_begin/end, not ``torch.cuda.graph``: that context synchronizes, empties the device
            # and pinned-host caches (and on some releases collects garbage) before every capture, which
            # a replica capturing dozens of shapes while serving pays each time. thread_local: the
            # replica's other threads (pinning a newly fetched adapter's buffers) may call CUDA meanwhile.
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self.forward(shape)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(side)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager forwards
            log.warning("CUDA graph capture of the forward of shape %s failed, running eagerly from now on: %s",
                        shape, exc)
            self.enabled = False
            self.error = f"{shape}: {type(exc).__name__}: {exc}"
            self._graphs.clear()
            return None
        self.captures += 1
        self._graphs[shape] = graph
        return graph
