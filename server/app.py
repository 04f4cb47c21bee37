"""The FastAPI application: middleware, error handlers and the routers of server/api.

Handlers translate between the wire and the session manager; they never touch tensors.
The process's state and its life (bring-up, drain, stop) are in server/state.py.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from server import protocol as P
from server.api import ops, recordings, sessions, stream, watch
from server.api.deps import error_response
from server.runner import ModelRunner
from server.sessions import Refused
from server.settings import Settings
from server.state import VERSION, AppState

__all__ = ["AppState", "VERSION", "create_app"]


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare a length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            resp = error_response(413, "body_too_large", f"request body over {self.limit} bytes")
            return await resp(scope, receive, send)
        # Read the whole body first (it is small by construction), then replay it: an
        # exception raised from inside the app's own body read would surface as FastAPI's
        # generic 400, not as the 413 the client needs.
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away: nothing to answer
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                resp = error_response(
                    413, "body_too_large", f"request body over {self.limit} bytes"
                )
                return await resp(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- the app ----------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, runner: ModelRunner | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings, runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        state.bring_up = asyncio.create_task(state.start(), name="shotstream-bring-up")
        state.bring_up.add_done_callback(lambda t: t.cancelled() or t.exception())
        yield
        await state.stop()

    app = FastAPI(
        title="ShotStream server",
        version=VERSION,
        description="Real-time multi-shot text-to-video streaming (protocol v1).",
        lifespan=lifespan,
    )
    app.state.shotstream = state
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(P.LimitError, _limit)
    app.include_router(sessions.router)
    app.include_router(stream.router)
    app.include_router(watch.router)
    app.include_router(recordings.router)
    app.include_router(ops.router)
    if settings.fault_injection:
        app.include_router(ops.debug_router)
    if ops.WEB.is_dir():
        app.mount("/web", StaticFiles(directory=ops.WEB), name="web")
    return app


async def _invalid(request: Request, exc: Exception):
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    detail = (
        f"{where}: {first.get('msg', 'invalid request')}"
        if where
        else first.get("msg", "invalid request")
    )
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return error_response(422, P.ErrorCode.BAD_MESSAGE, detail)


async def _refused(request: Request, exc: Exception):
    assert isinstance(exc, Refused)
    return error_response(exc.status, exc.code, exc.message, exc.retry_after)


async def _limit(request: Request, exc: Exception):
    assert isinstance(exc, P.LimitError)
    return error_response(422, exc.code, exc.message)
