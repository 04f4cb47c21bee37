"""The stream: `WS /v1/sessions/{id}/stream`, one sender and one receiver per connection.

The sender sends `hello`, `init` and the init segment, then the session's control lane
first and its media lane in order, until the connection closes. The receiver parses each
client message and hands it to the session manager. A bad message gets a non-fatal
`error`; past the abuse limit the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server import protocol as P
from server.api.deps import bearer
from server.delivery import Connection, MediaItem
from server.fanout import ViewerLink
from server.sessions import Refused, Session, SessionManager, TokenBucket
from server.state import AppState

log = logging.getLogger("shotstream.stream")
router = APIRouter()


@router.websocket("/v1/sessions/{sid}/stream")
async def stream(ws: WebSocket, sid: str):
    state: AppState = ws.app.state.shotstream
    opened = await open_reader(state, ws, sid)
    if opened is None:
        return
    m, s, link = opened
    if link is not None:
        return await refuse(
            ws, P.ErrorCode.FORBIDDEN, "a watch link's token streams at /watch, not /stream"
        )
    if s.state == "queued" and not await _wait_in_queue(state, ws, s):
        return
    if not s.alive:
        return await refuse(ws, P.ErrorCode.UNKNOWN_SESSION, f"session {sid} has {s.state}")
    if s.conn is not None:
        # The newer connection wins: the old one is most likely dead without our knowing
        # (a frozen or vanished client), and a client resuming must not wait for that.
        m.replace_connection(s)
    conn = Connection(ws.send_text, ws.send_bytes, ws.close, time.monotonic())
    features = _features(ws.query_params.get("features", ""))
    conn.withdraw = P.FEATURE_WITHDRAW in features
    conn.viewer_counts = P.FEATURE_VIEWERS in features
    m.attach(s, conn, _last_seq(ws.query_params.get("last_seq", "")))
    await serve_connection(
        ws,
        s,
        _sender(state, ws, s, conn),
        lambda sender: _receiver(state, ws, s, conn, sender),
        lambda: m.detach(s, conn),
        "stream",
    )


async def refuse(ws: WebSocket, code: str, message: str) -> None:
    """A fatal `error`, then the close its code calls for (the socket may be gone already)."""
    err = P.ErrorMessage(code=code, message=message, fatal=True)
    await _quietly("refusal", ws.send_text(json.dumps(err.model_dump())))
    await _quietly("close", ws.close(int(P.close_code_for(code)), P.close_reason(message)))


async def open_reader(
    state: AppState, ws: WebSocket, sid: str
) -> tuple[SessionManager, Session, ViewerLink | None] | None:
    """Accept a stream or watch connection and find the session its token reads: the
    owner's token (link None) or a watch link's. None once it was refused and closed."""
    await ws.accept()
    token = ws.query_params.get("token") or bearer(ws.headers)
    m = state.manager
    if m is None or not m.ready:
        code = P.ErrorCode.DRAINING if m and m.draining else P.ErrorCode.OVER_CAPACITY
        await refuse(ws, code, "server is not ready")
        return None
    if not token:
        await refuse(
            ws, P.ErrorCode.UNAUTHORIZED, "missing token (?token= or Authorization: Bearer)"
        )
        return None
    try:
        found = m.find_reader(sid, token)
    except Refused as exc:  # a revoked or expired watch link
        await refuse(ws, exc.code, exc.message)
        return None
    if found is None:
        await refuse(ws, P.ErrorCode.UNKNOWN_SESSION, f"no session {sid!r} for this token")
        return None
    return m, *found


async def serve_connection(
    ws: WebSocket,
    s: Session,
    sender: Coroutine[Any, Any, None],
    receive: Callable[[asyncio.Task], Awaitable[None]],
    detach: Callable[[], None],
    what: str,
) -> None:
    """Run an attached connection: its sender as a task, its receiver until either ends;
    then stop the sender, detach the connection and close the socket if still open."""
    task = asyncio.create_task(sender, name=f"{what}-{s.id}")
    try:
        await receive(task)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug in the sender: the connection ends, the server goes on
            log.error(f"{what} sender failed", extra={"session_id": s.id, "error": repr(exc)})
        detach()
        if ws.client_state == WebSocketState.CONNECTED:
            await _quietly("close", ws.close(1000))


async def incoming(
    ws: WebSocket, sender: asyncio.Task, s: Session, what: str
) -> AsyncIterator[Message]:
    """The client's frames as ASGI messages, until it leaves or the sender ends the
    connection (closed it)."""
    while True:
        recv = asyncio.create_task(ws.receive())
        done, _ = await asyncio.wait({recv, sender}, return_when=asyncio.FIRST_COMPLETED)
        if recv not in done:  # the sender finished (closed the connection)
            recv.cancel()
            return
        try:
            msg = recv.result()
        except (WebSocketDisconnect, RuntimeError) as exc:
            # starlette raises RuntimeError for a receive after the disconnect message
            log.debug(f"{what} receive ended", extra={"session_id": s.id, "error": repr(exc)})
            return
        if msg["type"] == "websocket.disconnect":
            return
        yield msg


async def _wait_in_queue(state: AppState, ws: WebSocket, s: Session) -> bool:
    """A session in the waiting room (docs/design/protocol.md §17): `queued` messages with
    its place whenever it moves (and its estimate, at most every 5 s) until it starts (True:
    the stream goes on with `hello`), or it ends or the client leaves (False). A ping is
    answered; a prompt, pause, resume or stop gets a non-fatal `invalid_state`."""
    m = state.manager
    assert m is not None
    me = object()
    if s.queue_waiter is not None:  # an older connection waits: the newer one wins
        s.queue_changed.set()
    s.queue_waiter = me
    recv: asyncio.Task | None = None
    try:
        last = None
        while s.state == "queued":
            if s.queue_waiter is not me:
                await refuse(
                    ws, P.ErrorCode.REPLACED, "a newer connection of this session took over"
                )
                return False
            info = m.queue_info(s)
            if info is not None and info != last:
                position, length, estimate = info
                queued = P.QueuedMessage(
                    position=position, queue_length=length, estimated_wait_s=estimate
                )
                await _send_json(ws, queued.model_dump(), state.settings.send_timeout_s)
                last = info
            s.queue_changed.clear()
            recv = recv or asyncio.create_task(ws.receive())
            changed = asyncio.ensure_future(s.queue_changed.wait())
            done, _ = await asyncio.wait(
                {recv, changed}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            changed.cancel()
            if recv in done:
                msg = recv.result()
                recv = None
                if msg["type"] == "websocket.disconnect":
                    return False
                parsed = P.parse_client_message(msg.get("text") or "", m.limits)
                if isinstance(parsed, P.PingMessage):
                    pong = P.PongMessage(server_time=time.time(), ref=parsed.ref)
                    await _send_json(ws, pong.model_dump(), state.settings.send_timeout_s)
                elif not isinstance(parsed, P.ProtocolError | P.PlayheadMessage):
                    # answered, so a client waiting for its ack does not wait in vain
                    err = P.ErrorMessage(
                        code=P.ErrorCode.INVALID_STATE,
                        message="the session is queued: it takes messages once it starts",
                        ref=parsed.ref,
                    )
                    await _send_json(ws, err.model_dump(), state.settings.send_timeout_s)
    except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError) as exc:
        log.debug("queued stream ended", extra={"session_id": s.id, "error": repr(exc)})
        return False
    finally:
        if recv is not None:
            recv.cancel()
        if s.queue_waiter is me:
            s.queue_waiter = None
    if s.alive:
        return True
    # It ended while waiting (its longest wait passed, deleted, draining): say so.
    reason = s.end_reason or s.state
    if s.error:
        fatal = P.ErrorMessage(code=P.ErrorCode.SESSION_FAILED, message=s.error, fatal=True)
        await _quietly("end", ws.send_text(json.dumps(fatal.model_dump())))
        await _quietly("close", ws.close(4500, P.close_reason(s.error)))
    else:
        await _quietly("end", ws.send_text(json.dumps(P.EndedMessage(reason=reason).model_dump())))
        code = 1001 if reason in ("draining", "shutdown") else 1000
        await _quietly("close", ws.close(code, P.close_reason(reason)))
    return False


async def _quietly(what: str, op) -> None:
    """Await a send or close on a socket that may already be gone; log why it failed."""
    try:
        await op
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        log.debug("stream %s on a closed connection", what, extra={"error": repr(exc)})


async def _bounded(op: Awaitable[None], timeout: float) -> None:
    """Await one send or close for at most `timeout` seconds (TimeoutError past it).

    Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as its
    operation completes, and a sender cancelled at that moment would live on."""
    async with asyncio.timeout(timeout):
        await op


async def _send_json(ws: WebSocket, msg: dict[str, Any], timeout: float) -> None:
    await _bounded(ws.send_text(json.dumps(msg)), timeout)


async def _sender(state: AppState, ws: WebSocket, s: Session, conn: Connection) -> None:
    """Send hello + init, then control messages first and media in order, until closed."""
    m, settings = state.manager, state.settings
    assert m is not None
    timeout = settings.send_timeout_s
    enc = s.encoder
    init = enc.init_segment()
    cfg = m.cfg
    box = s.outbox
    try:
        features = [P.FEATURE_WITHDRAW] if conn.withdraw else []
        features += [P.FEATURE_VIEWERS] if conn.viewer_counts else []
        hello = P.HelloMessage(
            session_id=s.id,
            mime=enc.mime,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            next_seq=conn.next_seq,
            features=features,
            viewers=len(s.audience.conns),
        )
        await _send_json(ws, hello.model_dump(), timeout)
        await _send_json(ws, P.InitMessage(bytes=len(init)).model_dump(), timeout)
        await _bounded(ws.send_bytes(init), timeout)
        state.metrics.bytes_sent.inc(len(init))
        while True:
            if conn.farewell is not None:  # replaced: the session's lanes are not ours now
                await _send_json(ws, conn.farewell, timeout)
                await _bounded(ws.close(conn.close_code, conn.close_reason), timeout)
                return
            while box.control and s.conn is conn:
                await _send_json(ws, box.control.popleft(), timeout)
            if conn.closing:
                await _bounded(ws.close(conn.close_code, conn.close_reason), timeout)
                return
            if box.media and s.conn is conn:
                item: MediaItem = box.media[0]
                conn.sending = item
                t0 = time.perf_counter()
                msg = dict(item.message)
                if item.data is not None:
                    msg.setdefault("timings", {})["queue_ms"] = round(
                        (time.monotonic() - item.ready) * 1e3, 3
                    )
                await _send_json(ws, msg, timeout)
                if item.data is not None:
                    await _bounded(ws.send_bytes(item.data), timeout)
                conn.sending = None
                if s.conn is not conn:  # replaced meanwhile: the new connection sends it
                    continue
                # Sent whole: only now does it leave the outbox (a reconnect resends the rest).
                m.delivered(s, item, time.perf_counter() - t0)
                continue
            conn.wake.clear()
            await conn.wake.wait()
    except TimeoutError:
        state.metrics.errors.labels("slow_reader").inc()
        log.warning("slow reader closed", extra={"session_id": s.id})
        await _quietly("close", ws.close(int(P.CloseCode.IDLE), "slow reader: send timed out"))
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        # The connection went away under a send (starlette raises RuntimeError for a send
        # after the close); the receiver sees the disconnect and detaches.
        log.debug("stream send ended", extra={"session_id": s.id, "error": repr(exc)})
    finally:
        # A chunk still in flight now never reached its owner whole: a recording the
        # session's end left open for it finishes without it.
        conn.sending = None
        m.settle_recording(s)


async def _receiver(
    state: AppState, ws: WebSocket, s: Session, conn: Connection, sender: asyncio.Task
) -> None:
    m = state.manager
    assert m is not None
    settings = state.settings
    bucket = TokenBucket(settings.ws_message_rate, 2 * settings.ws_message_rate)
    async for msg in incoming(ws, sender, s, "stream"):
        if conn.closing and conn.farewell is None:
            continue  # closed for abuse or the end: nothing more is read into the session
        # (A connection replaced by a newer one still has its client's messages read: they
        # were sent before the client reconnected, e.g. a prompt just before its socket died.)
        if not bucket.take():
            # A flood: drop unread (cheap), saying so once; past the limit, close.
            conn.dropped += 1
            if conn.dropped == 1:
                state.metrics.errors.labels("client_rate_limited").inc()
                m.send_control(
                    s,
                    P.ErrorMessage(
                        code=P.ErrorCode.RATE_LIMITED,
                        fatal=False,
                        message=f"more than {settings.ws_message_rate:g} "
                        "messages per second: the excess is dropped unanswered",
                    ),
                )
            if conn.dropped >= settings.ws_flood_limit:
                state.metrics.errors.labels("flood").inc()
                log.warning("stream flood closed", extra={"session_id": s.id})
                m.send_control(
                    s,
                    P.ErrorMessage(
                        code=P.ErrorCode.RATE_LIMITED,
                        fatal=True,
                        message=f"more than {settings.ws_message_rate:g} messages per second; closing this connection",
                    ),
                )
                conn.close_after_flush(int(P.CloseCode.RATE_LIMITED), "too many messages")
            continue
        data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
        parsed = P.parse_client_message(data if data is not None else "", m.limits)
        if isinstance(parsed, P.ProtocolError):
            _client_error(state, s, conn, parsed.code, parsed.message, ref=parsed.ref)
            continue
        ref = parsed.ref
        try:
            if isinstance(parsed, P.PromptMessage):
                p = await m.add_prompt(s, parsed.prompt, parsed.mode)
                m.send_control(
                    s,
                    P.PromptAckMessage(
                        shot_id=p.shot_id,
                        starts_at_seq=p.starts_at_seq,
                        truncated_tokens=p.report.truncated_tokens,
                        ref=ref,
                    ),
                )
            elif isinstance(parsed, P.PauseMessage):
                m.pause(s)
            elif isinstance(parsed, P.ResumeMessage):
                m.resume(s)
            elif isinstance(parsed, P.StopMessage):
                m.end(s, "stopped")
            elif isinstance(parsed, P.PingMessage):
                m.send_control(s, P.PongMessage(server_time=time.time(), ref=ref))
            elif isinstance(parsed, P.PlayheadMessage):
                m.report_playhead(s, conn, parsed.pts)
        except Refused as exc:
            _client_error(state, s, conn, exc.code, exc.message, counts=False, ref=ref)
        except P.LimitError as exc:
            _client_error(state, s, conn, exc.code, exc.message, ref=ref)
        except ValidationError as exc:
            _client_error(
                state, s, conn, P.ErrorCode.BAD_MESSAGE, P.describe_validation_error(exc), ref=ref
            )


def _features(text: str) -> set[str]:
    """The optional features a client asks for (`?features=a,b`); unknown ones are ignored
    (a newer client may ask for what this server does not have)."""
    return {f for f in text.split(",")[:8] if f in P.FEATURES}


def _last_seq(text: str) -> int | None:
    """The `last_seq` a resuming client names; None unless a plain decimal integer (not
    `²`, which isdigit() accepts and int() refuses, nor thousands of digits)."""
    digits = text.removeprefix("-")
    if not (0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()):
        return None
    return int(text)


def _client_error(
    state: AppState,
    s: Session,
    conn: Connection,
    code: str,
    message: str,
    counts: bool = True,
    ref: str | None = None,
) -> None:
    """A non-fatal error for one bad message; past the abuse limit, close the connection."""
    m = state.manager
    assert m is not None
    state.metrics.errors.labels("client_" + code).inc()
    if counts:
        conn.errors += 1
    if counts and conn.errors >= state.settings.abuse_limit:
        m.send_control(
            s,
            P.ErrorMessage(
                code=P.ErrorCode.TOO_MANY_ERRORS,
                fatal=True,
                message=f"{conn.errors} bad messages; closing this connection",
            ),
        )
        conn.close_after_flush(int(P.CloseCode.BAD_MESSAGE), "too many bad messages")
        return
    m.send_control(s, P.ErrorMessage(code=code, message=message, fatal=False, ref=ref))
