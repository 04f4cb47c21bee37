"""Replayable chunk steps: a chunk's denoise passes and its cache refresh captured as one
CUDA graph, so a chunk costs one launch instead of some thousands of kernel launches.

One graph per (caches, chunk index): chunk b attends over `[0, context + (b+1) chunk
tokens)` of its cache, a length that grows with b, so each index has its own shapes
(7 graphs for a full shot of one session); within an index every shape and every address
is fixed (weights, and caches preallocated and written in place). A graph reads its
inputs from static buffers (the noise draws, each row's shot flag and caption row) and
writes its x0 to a static output, cloned for the caller.

An option (`LoadedModel.chunk_graphs`), off by default: it is kept only if it wins on
the GPU (bench/device). On a CPU nothing is captured: `run` fills the same buffers and
calls the same step, so the CPU tests check the plumbing against the plain path.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.kv import KVCache
from model.dit import CausalDiT
from model.sampler import FlowSchedule
from model.steps import ChunkRow, batched_chunk_pass, denoise_chunk, refresh_cache


def chunk_step(
    dit: CausalDiT,
    schedule: FlowSchedule,
    rows: Sequence[ChunkRow],
    noise: torch.Tensor,
    renoise: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Denoise one chunk of each row and refresh its cache slot; returns x0 (B, F, C, h, w).

    The refresh runs before the caller decodes: it writes only the chunk's own slot, which
    a retry of the chunk rewrites before anything reads it, so the commit rule holds."""
    pass_ = batched_chunk_pass(dit, rows)
    x0 = denoise_chunk(dit, schedule, pass_, noise, renoise)
    refresh_cache(dit, pass_, x0)
    return x0


@dataclass
class _Entry:
    caches: list[weakref.ref[KVCache]]
    flags: torch.Tensor  # (B,) static inputs
    captions: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, F, C, h, w)
    renoise: list[torch.Tensor]
    out: torch.Tensor | None = None  # static output (captured graphs)
    graph: torch.cuda.CUDAGraph | None = None


class ChunkGraphs:
    """Captured chunk steps by (caches, chunk indices), least recently used dropped past
    `max_graphs`; a graph whose cache was freed is dropped with it."""

    def __init__(
        self,
        dit: CausalDiT,
        schedule: FlowSchedule,
        device: torch.device | str,
        max_graphs: int = 64,
    ) -> None:
        self.dit, self.schedule = dit, schedule
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda"
        self.max_graphs = max_graphs
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        # One memory pool for every graph: they replay one at a time on one stream, and
        # what outlives a replay (the static inputs and outputs) stays allocated.
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0  # graphs captured so far (for benchmarks and tests)

    def __len__(self) -> int:
        return len(self._entries)

    def run(
        self, rows: Sequence[ChunkRow], noise: torch.Tensor, renoise: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """`chunk_step` for `rows`, replaying (or first capturing) their graph."""
        key = tuple((id(r.kv), r.chunk_index) for r in rows)
        entry = self._entries.get(key)
        if entry is not None and any(
            ref() is not r.kv for ref, r in zip(entry.caches, rows, strict=True)
        ):
            entry = None  # an id reused by another cache
        fresh = entry is None
        if entry is None:
            entry = _Entry(
                [weakref.ref(r.kv) for r in rows],
                torch.empty(len(rows), dtype=torch.long, device=self.device),
                torch.empty(len(rows), dtype=torch.long, device=self.device),
                torch.empty_like(noise),
                [torch.empty_like(d) for d in renoise],
            )
        entry.flags.copy_(torch.cat([r.flag for r in rows]))
        entry.captions.copy_(torch.cat([r.caption for r in rows]))
        entry.noise.copy_(noise)
        for dst, src in zip(entry.renoise, renoise, strict=True):
            dst.copy_(src)
        if fresh:
            if self.capture:
                self._capture(entry, rows)
            self._entries[key] = entry
            for r in rows:
                weakref.finalize(r.kv, self._forget, id(r.kv))
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        if entry.graph is None:
            return self._step(entry, rows)
        entry.graph.replay()
        assert entry.out is not None
        return entry.out.clone()

    def _step(self, entry: _Entry, rows: Sequence[ChunkRow]) -> torch.Tensor:
        static_rows = [
            ChunkRow(r.kv, r.chunk_index, entry.flags[i : i + 1], entry.captions[i : i + 1])
            for i, r in enumerate(rows)
        ]
        return chunk_step(self.dit, self.schedule, static_rows, entry.noise, entry.renoise)

    def _capture(self, entry: _Entry, rows: Sequence[ChunkRow]) -> None:
        # Warm-up on a side stream (kernel choice, workspaces), as capture requires. It
        # computes this very chunk, and only writes the chunk's own cache slot.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(entry, rows)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            entry.out = self._step(entry, rows)
        entry.graph = graph
        self.captures += 1

    def _forget(self, cache_id: int) -> None:
        for key in [k for k in self._entries if any(c == cache_id for c, _ in k)]:
            del self._entries[key]
