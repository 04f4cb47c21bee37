"""The HTTP and WebSocket API (protocol v1): handlers translate, they never touch tensors.

Bring-up runs in the background after the process starts listening, so `/healthz` answers
while weights load; `/readyz` turns ready only after a warm-up chunk. On SIGTERM the CLI
calls `AppState.drain`: admission stops, `/readyz` fails, sessions may finish for a grace
period and are then ended with `ended` (reason `draining`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server import protocol as P
from server.engine import Engine
from server.metrics import Metrics
from server.runner import ModelRunner
from server.sessions import Connection, MediaItem, Refused, Session, SessionManager
from server.settings import Settings

log = logging.getLogger("shotstream.app")
WEB = Path(__file__).resolve().parent.parent / "clients" / "web"
VERSION = "0.1.0"


class AppState:
    """Everything one server process holds; routes reach it through `app.state.shotstream`."""

    def __init__(self, settings: Settings, runner: ModelRunner | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.runner = runner
        self.manager: SessionManager | None = None
        self.engine: Engine | None = None
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shotstream-encode")
        self.bring_up: asyncio.Task | None = None
        self.error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        m = self.manager
        return bool(m and m.ready and not m.draining and self.engine and self.engine.alive)

    async def start(self) -> None:
        """Load weights, start the engine, warm up; then report ready."""
        s = self.settings
        try:
            if self.runner is None:
                from model.config import get_preset

                cfg = get_preset(s.preset)
                if s.chunks_per_shot:
                    cfg = cfg.replace(chunks_per_shot=s.chunks_per_shot)
                self.runner = await asyncio.to_thread(
                    ModelRunner.load, cfg, s.weights, s.device, s.dtype,
                    s.attention, s.seed, s.prompt_overflow, _threads(s), s.compile,
                )  # fmt: skip
            runner = self.runner
            self.manager = SessionManager(s, runner, self.metrics)
            self.manager.encode_pool = self.encode_pool
            self.engine = Engine(self.manager)
            self.engine.start()
            self.metrics.build_info.info({
                "version": VERSION, "preset": runner.cfg.name, "device": runner.device_name,
                "torch": runner.torch_version, "attention": runner.model.attention_backend,
                "dtype": str(runner.model.dtype).removeprefix("torch."),
                "weights": "real" if runner.model.real_weights else "random",
            })  # fmt: skip
            if s.warmup:
                result = await runner.warmup()
                self.engine.seed_cost(result)
                await self._warm_encoder(result.frames)
            self.manager.ready = True
            log.info("ready", extra={"preset": runner.cfg.name, "device": runner.device_name,
                                     "capacity": self.engine.capacity(),
                                     "chunk_cost_s": round(self.engine.chunk_cost, 4)})  # fmt: skip
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.critical("bring-up failed", extra={"error": self.error})
            raise

    async def _warm_encoder(self, frames) -> None:
        from server.media import H264Encoder

        cfg = self.runner.cfg
        enc = H264Encoder(cfg.width, cfg.height, cfg.fps)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.encode_pool, enc.encode_chunk, frames
            )
        finally:
            enc.close()

    async def drain(self, grace: float | None = None) -> None:
        """Stop admitting, let sessions run up to `grace` seconds, then end the rest."""
        m = self.manager
        if m is None:
            return
        m.draining = True
        grace = self.settings.drain_grace_s if grace is None else grace
        log.info("draining", extra={"sessions": len(m.active), "grace_s": grace})
        deadline = time.monotonic() + grace
        while m.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for sess in list(m.active):
            m.end(sess, "draining")
        # Give the senders a moment to deliver `ended` and close.
        for _ in range(50):
            if not any(x.conn for x in m.ended.values() if x.conn is not None):
                break
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.bring_up and not self.bring_up.done():
            self.bring_up.cancel()
            with contextlib.suppress(BaseException):
                await self.bring_up
        if self.manager:
            for sess in list(self.manager.active):
                self.manager.end(sess, "shutdown")
        if self.engine:
            await self.engine.stop()
        if self.runner:
            await asyncio.to_thread(self.runner.shutdown)
            log.info("stopped", extra={"pool_bytes": self.runner.pool.bytes_in_use,
                                       "open_sessions": self.runner.open_sessions})  # fmt: skip
        self.encode_pool.shutdown(wait=False, cancel_futures=True)


def _threads(s: Settings) -> int:
    import os

    if s.threads:
        return s.threads
    # CPU: leave a core for the video encoder and the event loop.
    return max(1, (os.cpu_count() or 2) // 2)


# -- helpers -------------------------------------------------------------------------------
def error_response(
    status: int, code: str | None, detail: str, retry_after: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(
        P.ErrorBody(detail=detail, code=code).model_dump(), status_code=status, headers=headers
    )


def bearer(headers) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def client_key(request: Request) -> str:
    """Who a per-client quota counts: the client's address (one API key is shared by all
    callers, so it names no one; nor does any part of it belong in a log)."""
    return "ip:" + (request.client.host if request.client else "unknown")


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
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])  # fmt: skip
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
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

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        return error_response(exc.status, exc.code, exc.message, exc.retry_after)

    @app.exception_handler(P.LimitError)
    async def _limit(request: Request, exc: P.LimitError):
        return error_response(422, exc.code, exc.message)

    def manager() -> SessionManager:
        if state.manager is None:
            raise Refused(503, P.ErrorCode.OVER_CAPACITY, "server is starting", retry_after=5)
        return state.manager

    def session_for(request: Request, sid: str) -> Session:
        token = bearer(request.headers)
        if token is None:
            raise Refused(401, P.ErrorCode.UNAUTHORIZED, "missing 'Authorization: Bearer <token>'")
        s = manager().get(sid, token)
        if (
            s is None
        ):  # unknown and wrong token look the same: a session is visible only with its token
            raise Refused(404, P.ErrorCode.UNKNOWN_SESSION, f"no session {sid!r} for this token")
        return s

    # -- REST ------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, response_model=P.CreateSessionResponse,
              responses={422: {"model": P.ErrorBody}, 429: {"model": P.ErrorBody}, 503: {"model": P.ErrorBody}})  # fmt: skip
    async def create_session(req: P.CreateSessionRequest, request: Request):
        if settings.api_key:
            given = bearer(request.headers) or request.headers.get("x-api-key")
            import hmac

            if not given or not hmac.compare_digest(
                given.encode("utf-8", "surrogatepass"), settings.api_key.encode()
            ):
                raise Refused(
                    401, P.ErrorCode.UNAUTHORIZED, "a valid API key is needed to create sessions"
                )
        m = manager()
        client = client_key(request)
        m.admit(client)
        s, cut = m.create(client, req)
        base = settings.public_url or str(request.base_url).rstrip("/")
        ws_base = base.replace("https://", "wss://").replace("http://", "ws://")
        cfg = m.cfg
        return P.CreateSessionResponse(
            session_id=s.id, token=s.token, stream_url=f"{ws_base}/v1/sessions/{s.id}/stream",
            expires_at=m.expires_at(s), preset=cfg.name, width=cfg.width, height=cfg.height,
            fps=cfg.fps, truncated_tokens=cut,
        )  # fmt: skip

    @app.get("/v1/sessions/{sid}", response_model=P.SessionStatus,
             responses={401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}})  # fmt: skip
    async def get_session(sid: str, request: Request):
        s = session_for(request, sid)
        return manager().status(s)

    @app.post("/v1/sessions/{sid}/prompts", status_code=202, response_model=P.PromptAccepted,
              responses={401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody},
                         409: {"model": P.ErrorBody}, 422: {"model": P.ErrorBody}, 429: {"model": P.ErrorBody}})  # fmt: skip
    async def post_prompt(sid: str, req: P.PromptRequest, request: Request):
        s = session_for(request, sid)
        m = manager()
        p = m.add_prompt(s, req.prompt, req.mode)
        ack = P.PromptAckMessage(shot_id=p.shot_id, starts_at_seq=p.starts_at_seq,
                                 truncated_tokens=p.report.truncated_tokens)  # fmt: skip
        m.send_control(s, ack)  # the stream's timeline learns of it too
        return P.PromptAccepted(shot_id=p.shot_id, starts_at_seq=p.starts_at_seq,
                                truncated_tokens=p.report.truncated_tokens)  # fmt: skip

    @app.delete("/v1/sessions/{sid}", status_code=204,
                responses={401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}})  # fmt: skip
    async def delete_session(sid: str, request: Request):
        s = session_for(request, sid)
        manager().end(s, "deleted")
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/pause", status_code=204,
              responses={401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}})  # fmt: skip
    async def pause_session(sid: str, request: Request):
        """Stop generating (the stream's player should pause too); same as the `pause` message."""
        manager().pause(session_for(request, sid))
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/resume", status_code=204,
              responses={401: {"model": P.ErrorBody}, 404: {"model": P.ErrorBody}, 409: {"model": P.ErrorBody}})  # fmt: skip
    async def resume_session(sid: str, request: Request):
        """Resume a paused session; same as the `resume` message."""
        manager().resume(session_for(request, sid))
        return Response(status_code=204)

    @app.get("/v1/models", response_model=P.ModelInfo)
    async def models():
        runner = state.runner
        if runner is None:
            raise Refused(503, P.ErrorCode.OVER_CAPACITY, "model is loading", retry_after=5)
        cfg = runner.cfg
        return P.ModelInfo(
            preset=cfg.name, description=cfg.description, width=cfg.width, height=cfg.height,
            fps=cfg.fps, chunk_frames=cfg.chunk_pixel_frames(1), first_chunk_frames=cfg.chunk_pixel_frames(0),
            chunks_per_shot=cfg.chunks_per_shot, max_prompt_tokens=cfg.text.text_len,
            max_prompt_chars=settings.max_prompt_chars, max_shots=settings.max_shots_per_request,
            real_weights=runner.model.real_weights, weights=runner.model.weights,
            device=runner.device_name, dtype=str(runner.model.dtype).removeprefix("torch."),
            attention=runner.model.attention_backend,
            notice=None if runner.model.real_weights else
            f"preset {cfg.name} runs with RANDOM weights: the video is noise, not a trained model",
            vocabulary=runner.model.vocabulary,
        )  # fmt: skip

    if settings.fault_injection:

        @app.post("/v1/debug/faults", include_in_schema=False)
        async def inject_fault(body: dict[str, Any]):
            """TESTS ONLY: make a session's next step raise, or crash the engine loop."""
            kind = body.get("kind")
            if kind == "engine":
                state.engine.crash_requested = True
                state.engine.wake()
            elif kind in ("exception", "oom") and isinstance(body.get("session_id"), str):
                state.runner.faults[body["session_id"]] = kind
            else:
                raise Refused(
                    422, P.ErrorCode.BAD_MESSAGE, "kind: exception|oom (with session_id) or engine"
                )
            return {"injected": kind}

    @app.get("/healthz")
    async def healthz():
        # Liveness: ok while the weights load and while serving; a dead generation engine
        # never comes back, so fail here too and let the orchestrator restart the process.
        if state.engine is not None and state.engine.failed is not None:
            return JSONResponse({"status": "failed", "reason": "engine failed"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.ready:
            return {"status": "ready"}
        why = ("draining" if state.manager and state.manager.draining else
               state.error or ("engine failed" if state.engine and not state.engine.alive and state.manager
                               and state.manager.ready is False and state.engine.failed else "warming up"))  # fmt: skip
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    @app.get("/v1/capacity", response_model=P.CapacityInfo)
    async def capacity():
        """Free real-time session slots of this replica (for a proxy or an autoscaler)."""
        m, engine = state.manager, state.engine
        if m is None or engine is None:
            return P.CapacityInfo(replica_id=settings.replica_id, ready=False, draining=False,
                                  capacity=0, sessions=0, free_slots=0)  # fmt: skip
        return P.CapacityInfo(
            replica_id=settings.replica_id, ready=state.ready, draining=m.draining,
            capacity=engine.capacity() if m.ready else 0, sessions=len(m.active),
            free_slots=engine.free_slots() if state.ready else 0,
        )  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/", include_in_schema=False)
    async def index():
        page = WEB / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return PlainTextResponse("ShotStream server: see /docs for the API.")

    if WEB.is_dir():
        app.mount("/web", StaticFiles(directory=WEB), name="web")

    # -- WebSocket --------------------------------------------------------------------------
    @app.websocket("/v1/sessions/{sid}/stream")
    async def stream(ws: WebSocket, sid: str):
        await ws.accept()
        token = ws.query_params.get("token") or bearer(ws.headers)

        async def refuse(code: str, message: str) -> None:
            with contextlib.suppress(Exception):
                await ws.send_text(
                    json.dumps(P.ErrorMessage(code=code, message=message, fatal=True).model_dump())
                )
                await ws.close(int(P.close_code_for(code)), message[:120])

        m = state.manager
        if m is None or not m.ready:
            code = P.ErrorCode.DRAINING if m and m.draining else P.ErrorCode.OVER_CAPACITY
            return await refuse(code, "server is not ready")
        if not token:
            return await refuse(
                P.ErrorCode.UNAUTHORIZED, "missing token (?token= or Authorization: Bearer)"
            )
        s = m.get(sid, token)
        if s is None:
            return await refuse(P.ErrorCode.UNKNOWN_SESSION, f"no session {sid!r} for this token")
        if not s.alive:
            return await refuse(P.ErrorCode.UNKNOWN_SESSION, f"session {sid} has {s.state}")
        if s.conn is not None:
            return await refuse(
                P.ErrorCode.ALREADY_CONNECTED, "this session already has a stream connection"
            )
        conn = Connection(ws.send_text, ws.send_bytes, ws.close, time.monotonic())
        conn.next_seq = m.attach(s, conn, _last_seq(ws.query_params.get("last_seq", "")))  # type: ignore[attr-defined]
        sender = asyncio.create_task(_sender(state, ws, s, conn), name=f"send-{sid}")
        try:
            await _receiver(state, ws, s, conn, sender)
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            m.detach(s, conn)
            if ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await ws.close(1000)

    return app


async def _send_json(ws: WebSocket, msg: dict[str, Any], timeout: float) -> None:
    await asyncio.wait_for(ws.send_text(json.dumps(msg)), timeout)


async def _sender(state: AppState, ws: WebSocket, s: Session, conn: Connection) -> None:
    """Send hello + init, then control messages first and media in order, until closed."""
    m, settings = state.manager, state.settings
    timeout = settings.send_timeout_s
    enc = s.encoder
    init = enc.init_segment()
    cfg = m.cfg
    try:
        hello = P.HelloMessage(session_id=s.id, mime=enc.mime, width=cfg.width, height=cfg.height,
                               fps=cfg.fps, next_seq=getattr(conn, "next_seq", 0))  # fmt: skip
        await _send_json(ws, hello.model_dump(), timeout)
        await _send_json(ws, P.InitMessage(bytes=len(init)).model_dump(), timeout)
        await asyncio.wait_for(ws.send_bytes(init), timeout)
        state.metrics.bytes_sent.inc(len(init))
        while True:
            while s.control:
                await _send_json(ws, s.control.popleft(), timeout)
            if conn.closing:
                await ws.close(getattr(conn, "close_code", 1000), getattr(conn, "close_reason", ""))
                return
            if s.media:
                item: MediaItem = s.media[0]
                t0 = time.perf_counter()
                msg = dict(item.message)
                if item.data is not None:
                    msg.setdefault("timings", {})["queue_ms"] = round(
                        (time.monotonic() - item.ready) * 1e3, 3
                    )
                await _send_json(ws, msg, timeout)
                if item.data is not None:
                    await asyncio.wait_for(ws.send_bytes(item.data), timeout)
                # Sent whole: only now does it leave the outbox (a reconnect resends the rest).
                if s.media and s.media[0] is item:
                    s.media.popleft()
                m.delivered(s, item, time.perf_counter() - t0)
                continue
            conn.wake.clear()
            await conn.wake.wait()
    except TimeoutError:
        state.metrics.errors.labels("slow_reader").inc()
        log.warning("slow reader closed", extra={"session_id": s.id})
        with contextlib.suppress(Exception):
            await ws.close(int(P.CloseCode.IDLE), "slow reader: send timed out")
    except (WebSocketDisconnect, RuntimeError, OSError):
        return  # the receiver sees the disconnect and detaches


async def _receiver(
    state: AppState, ws: WebSocket, s: Session, conn: Connection, sender: asyncio.Task
) -> None:
    m, _settings = state.manager, state.settings
    while True:
        recv = asyncio.create_task(ws.receive())
        done, _ = await asyncio.wait({recv, sender}, return_when=asyncio.FIRST_COMPLETED)
        if recv not in done:  # the sender finished (closed the connection)
            recv.cancel()
            return
        try:
            msg = recv.result()
        except (WebSocketDisconnect, RuntimeError):
            return
        if msg["type"] == "websocket.disconnect":
            return
        data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
        parsed = P.parse_client_message(data if data is not None else "", m.limits)
        if isinstance(parsed, P.ProtocolError):
            _client_error(state, s, conn, parsed.code, parsed.message, ref=_ref_of(data))
            continue
        ref = parsed.ref
        try:
            if isinstance(parsed, P.PromptMessage):
                p = m.add_prompt(s, parsed.prompt, parsed.mode)
                m.send_control(s, P.PromptAckMessage(shot_id=p.shot_id, starts_at_seq=p.starts_at_seq,
                                                     truncated_tokens=p.report.truncated_tokens, ref=ref))  # fmt: skip
            elif isinstance(parsed, P.PauseMessage):
                m.pause(s)
            elif isinstance(parsed, P.ResumeMessage):
                m.resume(s)
            elif isinstance(parsed, P.StopMessage):
                m.end(s, "stopped")
            elif isinstance(parsed, P.PingMessage):
                m.send_control(s, P.PongMessage(server_time=time.time(), ref=ref))
        except Refused as exc:
            _client_error(state, s, conn, exc.code, exc.message, counts=False, ref=ref)
        except P.LimitError as exc:
            _client_error(state, s, conn, exc.code, exc.message, ref=ref)
        except ValidationError as exc:
            _client_error(
                state, s, conn, P.ErrorCode.BAD_MESSAGE, P.describe_validation_error(exc), ref=ref
            )


def _last_seq(text: str) -> int | None:
    """The `last_seq` a resuming client names; None unless a plain decimal integer (not
    `²`, which isdigit() accepts and int() refuses, nor thousands of digits)."""
    digits = text.removeprefix("-")
    if not (0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()):
        return None
    return int(text)


def _ref_of(data: str | bytes | None) -> str | None:
    """The `ref` of a message that failed validation, if one can be read from it."""
    if not isinstance(data, str) or len(data) > 65536:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    ref = obj.get("ref") if isinstance(obj, dict) else None
    return ref if isinstance(ref, str) and len(ref) <= 64 else None


def _client_error(state: AppState, s: Session, conn: Connection, code: str, message: str,
                  counts: bool = True, ref: str | None = None) -> None:  # fmt: skip
    """A non-fatal error for one bad message; past the abuse limit, close the connection."""
    m = state.manager
    state.metrics.errors.labels("client_" + code).inc()
    if counts:
        conn.errors += 1
    if counts and conn.errors >= state.settings.abuse_limit:
        m.send_control(s, P.ErrorMessage(code=P.ErrorCode.TOO_MANY_ERRORS, fatal=True,
                                         message=f"{conn.errors} bad messages; closing this connection"))  # fmt: skip
        conn.closing = True
        conn.close_code, conn.close_reason = int(P.CloseCode.BAD_MESSAGE), "too many bad messages"  # type: ignore[attr-defined]
        conn.wake.set()
        return
    m.send_control(s, P.ErrorMessage(code=code, message=message, fatal=False, ref=ref))
