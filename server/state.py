"""What one server process holds, and its life: bring-up, drain, stop.

Bring-up runs in the background after the process starts listening, so `/healthz` answers
while weights load; `/readyz` turns ready only after a warm-up chunk. On SIGTERM the CLI
calls `AppState.drain`: admission stops, `/readyz` fails, sessions that never connected end
at once, connected ones may finish for a grace period and are then ended with `ended`
(reason `draining`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from model.config import get_preset
from server.delivery import new_encoder
from server.engine import Engine
from server.metrics import Metrics
from server.recording import Recorder
from server.runner import ModelRunner
from server.sessions import SessionManager
from server.settings import Settings

log = logging.getLogger("shotstream.app")
VERSION = "0.1.0"


class AppState:
    """Everything one server process holds; routes reach it through `app.state.shotstream`."""

    def __init__(self, settings: Settings, runner: ModelRunner | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.runner = runner
        self.manager: SessionManager | None = None
        self.engine: Engine | None = None
        self.recorder: Recorder | None = None
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shotstream-encode")
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shotstream-text")
        self.bring_up: asyncio.Task | None = None
        self.error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        m = self.manager
        return bool(m and m.ready and not m.draining and self.engine and self.engine.alive)

    def not_ready_reason(self) -> str:
        m, engine = self.manager, self.engine
        if m is not None and m.draining:
            return "draining"
        if self.error:
            return self.error
        if engine is not None and engine.failed is not None:
            return "engine failed"
        return "warming up"

    async def start(self) -> None:
        """Load weights, start the engine, warm up; then report ready."""
        s = self.settings
        try:
            if self.runner is None:
                cfg = get_preset(s.preset)
                if s.chunks_per_shot:
                    cfg = cfg.replace(chunks_per_shot=s.chunks_per_shot)
                self.runner = await asyncio.to_thread(
                    ModelRunner.load,
                    cfg,
                    s.weights,
                    s.device,
                    s.dtype,
                    s.attention,
                    s.seed,
                    s.prompt_overflow,
                    _threads(s),
                    s.compile,
                )
            runner = self.runner
            self.manager = SessionManager(s, runner, self.metrics, self.encode_pool, self.text_pool)
            self.recorder = Recorder(s, self.metrics, runner.cfg)
            self.recorder.start()
            self.manager.recorder = self.recorder
            self.engine = Engine(self.manager)
            self.engine.start()
            self.metrics.build_info.info(
                {
                    "version": VERSION,
                    "preset": runner.cfg.name,
                    "device": runner.device_name,
                    "torch": runner.torch_version,
                    "attention": runner.model.attention_backend,
                    "dtype": str(runner.model.dtype).removeprefix("torch."),
                    "weights": "real" if runner.model.real_weights else "random",
                }
            )
            if s.warmup:
                result = await runner.warmup()
                self.engine.seed_cost(result)
                await self._warm_encoder(result.frames)
            self.manager.ready = True
            log.info(
                "ready",
                extra={
                    "preset": runner.cfg.name,
                    "device": runner.device_name,
                    "capacity": self.engine.capacity(),
                    "chunk_cost_s": round(self.engine.chunk_cost, 4),
                },
            )
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.critical("bring-up failed", extra={"error": self.error})
            raise

    async def _warm_encoder(self, frames) -> None:
        assert self.runner is not None
        enc = new_encoder(self.runner.cfg)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.encode_pool, enc.encode_chunk, frames
            )
        finally:
            enc.close()

    async def drain(self, grace: float | None = None) -> None:
        """Stop admitting, end never-connected sessions, let the others run up to `grace`
        seconds, then end the rest and let their streams deliver `ended`."""
        m = self.manager
        if m is None:
            return
        m.draining = True
        grace = self.settings.drain_grace_s if grace is None else grace
        log.info("draining", extra={"sessions": len(m.active), "grace_s": grace})
        # Nobody watches a session that never connected (nor one still waiting for a slot):
        # it ends now, not after the grace.
        for sess in list(m.waiting):
            m.end(sess, "draining")
        for sess in [x for x in m.active if not x.ever_connected]:
            m.end(sess, "draining")
        deadline = time.monotonic() + grace
        while m.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for sess in list(m.active):
            m.end(sess, "draining")
        # Let the senders deliver `ended` and close before the process exits.
        for _ in range(50):
            if not any(x.conn is not None for x in m.ended.values()):
                break
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.bring_up and not self.bring_up.done():
            self.bring_up.cancel()
            with contextlib.suppress(BaseException):
                await self.bring_up
        if self.manager:
            for sess in [*self.manager.waiting, *self.manager.active]:
                self.manager.end(sess, "shutdown")
        if self.engine:
            await self.engine.stop()
        if self.recorder:
            await self.recorder.close()
        if self.runner:
            await asyncio.to_thread(self.runner.shutdown)
            log.info(
                "stopped",
                extra={
                    "pool_bytes": self.runner.pool.bytes_in_use,
                    "open_sessions": self.runner.open_sessions,
                },
            )
        self.encode_pool.shutdown(wait=False, cancel_futures=True)
        self.text_pool.shutdown(wait=False, cancel_futures=True)


def _threads(s: Settings) -> int:
    if s.threads:
        return s.threads
    # CPU: leave a core for the video encoder and the event loop.
    return max(1, (os.cpu_count() or 2) // 2)
