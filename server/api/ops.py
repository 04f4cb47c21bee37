"""Operational routes: liveness, readiness, capacity, metrics, the model, the web page,
and (tests only) fault injection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from server import protocol as P
from server.api.deps import State
from server.sessions import Refused

router = APIRouter()
WEB = Path(__file__).resolve().parents[2] / "clients" / "web"


@router.get("/healthz")
async def healthz(state: State):
    # Liveness: ok while the weights load and while serving; a dead generation engine
    # never comes back, so fail here too and let the orchestrator restart the process.
    if state.engine is not None and state.engine.failed is not None:
        return JSONResponse({"status": "failed", "reason": "engine failed"}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State):
    if state.ready:
        return {"status": "ready"}
    return JSONResponse(
        {"status": "not ready", "reason": state.not_ready_reason()}, status_code=503
    )


@router.get("/v1/capacity", response_model=P.CapacityInfo)
async def capacity(state: State):
    """Free real-time session slots of this replica (for a proxy or an autoscaler)."""
    m, engine, replica = state.manager, state.engine, state.settings.replica_id
    if m is None or engine is None:
        return P.CapacityInfo(
            replica_id=replica, ready=False, draining=False, capacity=0, sessions=0, free_slots=0
        )
    return P.CapacityInfo(
        replica_id=replica,
        ready=state.ready,
        draining=m.draining,
        capacity=engine.capacity() if m.ready else 0,
        sessions=len(m.active),
        free_slots=engine.free_slots() if state.ready else 0,
    )


@router.get("/metrics")
async def metrics(state: State):
    return PlainTextResponse(
        state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


@router.get("/v1/models", response_model=P.ModelInfo)
async def models(state: State):
    runner, settings = state.runner, state.settings
    if runner is None:
        raise Refused(503, P.ErrorCode.OVER_CAPACITY, "model is loading", retry_after=5)
    cfg, model = runner.cfg, runner.model
    return P.ModelInfo(
        preset=cfg.name,
        description=cfg.description,
        width=cfg.width,
        height=cfg.height,
        fps=cfg.fps,
        chunk_frames=cfg.chunk_pixel_frames(1),
        first_chunk_frames=cfg.chunk_pixel_frames(0),
        chunks_per_shot=cfg.chunks_per_shot,
        max_prompt_tokens=cfg.text.text_len,
        max_prompt_chars=settings.max_prompt_chars,
        max_shots=settings.max_shots_per_request,
        real_weights=model.real_weights,
        weights=weights_name(settings.weights, cfg.name, model.weights, model.real_weights),
        device=runner.device_name,
        dtype=str(model.dtype).removeprefix("torch."),
        attention=model.attention_backend,
        notice=None
        if model.real_weights
        else f"preset {cfg.name} runs with RANDOM weights: the video is noise, not a trained model",
        vocabulary=model.vocabulary,
    )


def weights_name(folder: str | None, preset: str, source: str, real: bool) -> str:
    """What `/v1/models` says the weights are: a name, never a path on this host (the route
    is public)."""
    if not real:
        return source  # "random (seed N)"
    if folder is None:
        return f"bundled {preset} weights"
    return Path(os.path.abspath(folder)).name or "weights folder"


@router.get("/", include_in_schema=False)
async def index():
    page = WEB / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return PlainTextResponse("ShotStream server: see /docs for the API.")


debug_router = APIRouter(include_in_schema=False)


@debug_router.post("/v1/debug/faults")
async def inject_fault(body: dict[str, Any], state: State):
    """TESTS ONLY: make a session's next step raise, its recording's next write fail
    (`disk_full`; `partial`: half of it written first), or crash the engine loop."""
    kind = body.get("kind")
    if kind == "engine" and state.engine is not None:
        state.engine.crash_requested = True
        state.engine.wake()
    elif kind in ("exception", "oom") and isinstance(body.get("session_id"), str) and state.runner:
        state.runner.faults[body["session_id"]] = kind
    elif kind in ("disk_full", "partial") and isinstance(body.get("session_id"), str):
        if state.recorder is None:
            raise Refused(409, P.ErrorCode.INVALID_STATE, "not recording")
        state.recorder.faults[body["session_id"]] = kind  # its recording's next write fails
    else:
        raise Refused(
            422,
            P.ErrorCode.BAD_MESSAGE,
            "kind: exception|oom|disk_full|partial (with session_id) or engine",
        )
    return {"injected": kind}
