"""The runner: the one piece of the server that touches the model and its tensors.

Everything here runs on a single worker thread that owns the device. The event loop hands
it the scheduler's plan through one entry point, `await runner.execute(plan)`, and never
blocks on torch; results come back as plain numbers and uint8 numpy frames. Device facts
the loop reads (free memory, allocator stats) are refreshed by the worker after each plan,
so no request handler or scrape queries the device.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cache.kv import KVLayout
from cache.pool import Lease, StatePool
from model.config import ModelConfig
from model.generator import LoadedModel, ShotStreamGenerator, load_model, next_chunks
from model.text import CaptionSpec, PromptTooLong

if TYPE_CHECKING:  # the scheduler imports this module
    from server.scheduler import Plan

log = logging.getLogger("shotstream.runner")


@dataclass(frozen=True)
class TokenReport:
    """How a caption fits the text encoder: tokens cut and whether the shot text was cut."""

    truncated_tokens: int
    shot_text_cut: bool


@dataclass
class StepResult:
    """One chunk from the worker: frames, position, per-verb ms, and a new shot's report."""

    frames: np.ndarray  # (n, H, W, 3) uint8
    shot: int
    chunk: int
    last_in_shot: bool
    timings: dict[str, float]
    worker_s: float  # wall time the worker spent on this step
    new_shot: TokenReport | None = None
    shot_timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    """What the runner returns for a plan: one result per row, or the step's exception."""

    results: list[StepResult] | None = None
    error: BaseException | None = None


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a session's step."""


class ModelRunner:
    """Owns the loaded model, the state pool and the worker thread."""

    def __init__(self, model: LoadedModel, threads: int = 0, compile_mode: str = "off"):
        self.model = model
        if compile_mode != "off":
            # Shapes vary per chunk index (the key length): dynamo marks that dim dynamic
            # after the first recompile, so warm-up pays for two compilations.
            model.dit.compile(mode=None if compile_mode == "default" else compile_mode)
        self.cfg: ModelConfig = model.cfg
        self.pool = StatePool(
            KVLayout.for_config(self.cfg), model.vae.new_decoder_state, model.dtype, model.device
        )
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shotstream-worker")
        self._executor.submit(self._init_worker_thread).result()
        self._sessions: dict[str, tuple[Lease, ShotStreamGenerator]] = {}
        self.faults: dict[str, str] = {}  # test-only: session id -> "exception" | "oom"
        self.decoder_bytes_per_session = 0  # measured at warm-up (steady state)
        self.shot_start_s = 0.0  # worker seconds of a shot start + its first chunk (warm-up)
        # Device facts for the event loop, refreshed by the worker (see _refresh_device_facts).
        self.free_bytes = 0
        self.device_memory: dict[str, int] = {}
        self._executor.submit(self._refresh_device_facts).result()

    @classmethod
    def load(
        cls,
        cfg: ModelConfig,
        weights: str | None,
        device: str,
        dtype: str,
        attention: str,
        seed: int,
        prompt_overflow: str,
        threads: int,
        compile_mode: str = "off",
    ) -> ModelRunner:
        model = load_model(cfg, weights, device, dtype, attention, seed, prompt_overflow)
        return cls(model, threads, compile_mode)

    def _init_worker_thread(self) -> None:
        torch.set_flush_denormal(True)  # per thread: the worker computes, not the caller
        if self._threads:
            torch.set_num_threads(self._threads)
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- facts about the model (any thread) -----------------------------------------
    @property
    def device_name(self) -> str:
        d = self.model.device
        return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"

    @property
    def torch_version(self) -> str:
        return torch.__version__

    def kv_bytes_per_session(self) -> int:
        return self.cfg.kv_bytes_per_session(self.model.dtype)

    def frame_bytes_per_session(self) -> int:
        """Decoded frames a session keeps for context selection (a full shot, worst case)."""
        c = self.cfg
        el = torch.empty((), dtype=self.model.vae.dtype).element_size()
        return c.pixel_frames_per_shot * 3 * c.height * c.width * el

    def bytes_per_session(self) -> int:
        return (
            self.kv_bytes_per_session()
            + self.decoder_bytes_per_session
            + self.frame_bytes_per_session()
        )

    def free_device_bytes(self) -> int:
        """Memory available for new sessions (device free + pool free list on CUDA, else
        RAM), as the worker last read it."""
        return self.free_bytes

    def memory_stats(self) -> dict[str, int]:
        """CUDA allocator figures as the worker last read them ({} on CPU)."""
        return self.device_memory

    def _refresh_device_facts(self) -> None:
        """Worker thread: read free memory and allocator stats once, for the loop to use."""
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            self.free_bytes = int(free) + self.pool.bytes_reserved
            self.device_memory = {
                "allocated": torch.cuda.memory_allocated(self.model.device),
                "reserved": torch.cuda.memory_reserved(self.model.device),
            }
            return
        self.free_bytes = _available_ram()

    def check_caption(self, global_caption: str, shot_index: int, shot_text: str) -> TokenReport:
        """Tokenize a caption (no model call): what would be cut; PromptTooLong under `reject`."""
        tc = self.model.text.tokenize(CaptionSpec(global_caption, shot_index, shot_text))
        return TokenReport(tc.truncated_tokens, tc.shot_text_cut)

    # -- work on the worker thread ----------------------------------------------------
    async def warmup(self) -> StepResult:
        """Run one throw-away session for a chunk: weights touched, kernels ready, costs known."""
        result = await self._run(self._warmup)
        return result

    def _warmup(self) -> StepResult:
        sid = "__warmup__"
        try:
            self._open(sid, "warm-up", 0)
            first = self._step(sid, "warm-up")
            second = self._step(sid, None)  # a steady chunk: decoder slots at full size
            self.decoder_bytes_per_session = self._sessions[sid][0].decoder.nbytes
            self.shot_start_s = first.worker_s  # a shot start and its first chunk
            return second if second.worker_s else first
        finally:
            self._close(sid)

    async def execute(self, plan: Plan) -> Outcome:
        """Carry out a scheduler plan on the worker: free the state of `plan.finish`, then
        run `plan.rows` as one step (one session, or several continuing their shots as one
        batch). A failing step comes back as `Outcome.error`, never raised."""
        return await self._run(self._execute, plan)

    def _execute(self, plan: Plan) -> Outcome:
        try:
            for sid in plan.finish:
                self._close(sid)
            if not plan.rows:
                return Outcome(results=[])
            try:
                if len(plan.rows) == 1:
                    w = plan.rows[0]
                    result = self._guarded_step(w.session.id, w.shot_text, w.init, w.truncate_to)
                    return Outcome(results=[result])
                return Outcome(results=self._step_batch([w.session.id for w in plan.rows]))
            except Exception as exc:  # the scheduler decides: retry alone, or fail the session
                return Outcome(error=exc)
        finally:
            self._refresh_device_facts()

    def _guarded_step(
        self,
        sid: str,
        shot_text: str | None,
        init: tuple[str, int] | None,
        truncate_to: int | None = None,
    ) -> StepResult:
        try:
            if init is not None and sid not in self._sessions:
                self._open(sid, *init)
            return self._step(sid, shot_text, truncate_to)
        except torch.OutOfMemoryError as exc:
            # Free this session's state now and give the memory back, so the others keep
            # their headroom (the only place the worker collects and empties the cache).
            self._close(sid)
            self.pool.trim()
            if self.model.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            raise OutOfMemory(str(exc).splitlines()[0]) from None

    def _open(self, sid: str, global_caption: str, seed: int) -> None:
        lease = self.pool.acquire(sid)
        try:
            gen = ShotStreamGenerator(self.model, lease, global_caption, seed=seed)
        except BaseException:
            self.pool.release(lease)
            raise
        self._sessions[sid] = (lease, gen)

    def _step(self, sid: str, shot_text: str | None, truncate_to: int | None = None) -> StepResult:
        t0 = time.perf_counter()
        _, gen = self._sessions[sid]
        report, shot_timings = None, {}
        if truncate_to is not None:  # an instant cut: the withdrawn frames were never made
            gen.truncate_shot(truncate_to)
        if shot_text is not None:
            start = gen.start_shot(shot_text)
            report = TokenReport(start.truncated_tokens, start.shot_text_cut)
            shot_timings = start.timings
        self._raise_injected(sid)
        out = gen.next_chunk()
        return StepResult(
            frames=out.frames.numpy(),
            shot=out.shot,
            chunk=out.chunk,
            last_in_shot=out.last_in_shot,
            timings=out.timings,
            worker_s=time.perf_counter() - t0,
            new_shot=report,
            shot_timings=shot_timings,
        )

    def _step_batch(self, sids: list[str]) -> list[StepResult]:
        t0 = time.perf_counter()
        for sid in sids:
            self._raise_injected(sid)
        try:
            outs = next_chunks([self._sessions[sid][1] for sid in sids])
        except torch.OutOfMemoryError as exc:
            # Whose? Unknown in a batch: the engine retries each session alone.
            raise OutOfMemory(str(exc).splitlines()[0]) from None
        per = (time.perf_counter() - t0) / len(sids)  # each session's share of the step
        return [
            StepResult(
                frames=o.frames.numpy(),
                shot=o.shot,
                chunk=o.chunk,
                last_in_shot=o.last_in_shot,
                timings=o.timings,
                worker_s=per,
            )
            for o in outs
        ]

    def _raise_injected(self, sid: str) -> None:
        fault = self.faults.pop(sid, None)
        if fault == "oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
            )
        if fault == "exception":
            raise RuntimeError("injected fault")

    def _close(self, sid: str) -> None:
        """Return the session's state to the pool (kept there for the next session: no
        collection or cache emptying here, which would stall every other stream)."""
        entry = self._sessions.pop(sid, None)
        if entry is None:
            return
        self.pool.release(entry[0])

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def shutdown(self) -> None:
        """Stop the worker, then return every session's state still held (a close queued
        behind a cancelled step, or a session whose step was abandoned at shutdown)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for sid in list(self._sessions):
            self._close(sid)


def _available_ram() -> int:
    """MemAvailable of /proc/meminfo in bytes (a very large number where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


__all__ = ["ModelRunner", "OutOfMemory", "Outcome", "PromptTooLong", "StepResult", "TokenReport"]
