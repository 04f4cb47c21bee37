"""The viewers' stream: `WS /v1/sessions/{id}/watch`, read-only (docs/design/protocol.md §15).

A watch link's token (or the owner's) opens it. The viewer gets `hello` (role `viewer`),
`init` and the init segment, then the current shot's `shot` message and the latest chunk
the owner was sent, and from there what the owner is sent (server/fanout.py). It may send
`ping` (and `playhead`, ignored); anything that would change the session is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from server import protocol as P
from server.api.stream import (
    _bounded,
    _features,
    _quietly,
    _send_json,
    incoming,
    open_reader,
    refuse,
    serve_connection,
)
from server.delivery import MediaItem
from server.fanout import ViewerConnection
from server.metrics import Metrics
from server.sessions import Refused, Session, TokenBucket
from server.state import AppState

log = logging.getLogger("shotstream.watch")
router = APIRouter()


@router.websocket("/v1/sessions/{sid}/watch")
async def watch(ws: WebSocket, sid: str):
    state: AppState = ws.app.state.shotstream
    opened = await open_reader(state, ws, sid)
    if opened is None:
        return
    m, s, link = opened
    if not s.alive and s.state != "queued":
        return await refuse(ws, P.ErrorCode.UNKNOWN_SESSION, f"session {sid} has {s.state}")
    conn = ViewerConnection(ws.send_text, ws.send_bytes, ws.close, time.monotonic(), link=link)
    conn.withdraw = P.FEATURE_WITHDRAW in _features(ws.query_params.get("features", ""))
    try:
        m.attach_viewer(s, conn)
    except Refused as exc:
        return await refuse(ws, exc.code, exc.message)
    await serve_connection(
        ws,
        s,
        _sender(state, ws, s, conn),
        lambda sender: _receiver(state, ws, s, conn, sender),
        lambda: m.detach_viewer(s, conn),
        "watch",
    )


async def _sender(state: AppState, ws: WebSocket, s: Session, conn: ViewerConnection) -> None:
    """hello + init, then the viewer's control lane first and its media in order."""
    m, metrics = state.manager, state.metrics
    assert m is not None
    timeout = state.settings.viewer_stall_s
    enc, cfg = s.encoder, m.cfg
    init = enc.init_segment()
    try:
        hello = P.HelloMessage(
            session_id=s.id,
            mime=enc.mime,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            next_seq=conn.next_seq,
            features=[P.FEATURE_WITHDRAW] if conn.withdraw else [],
            role="viewer",
            viewers=len(s.audience.conns),
        )
        await _send_json(ws, hello.model_dump(), timeout)
        await _send_json(ws, P.InitMessage(bytes=len(init)).model_dump(), timeout)
        await _bounded(ws.send_bytes(init), timeout)
        metrics.viewer_bytes_sent.inc(len(init))
        while True:
            link = conn.link
            if link is not None and not conn.closing and link.state(time.monotonic()) != "active":
                msg = f"this watch link was {link.state(time.monotonic())}"
                err = P.ErrorMessage(code=P.ErrorCode.UNAUTHORIZED, message=msg, fatal=True)
                conn.push_control(err.model_dump())
                conn.close_after_flush(int(P.CloseCode.UNAUTHORIZED), msg)
            while conn.control:
                await _send_json(ws, conn.control.popleft(), timeout)
            if conn.closing:
                await _bounded(ws.close(conn.close_code, conn.close_reason), timeout)
                return
            if conn.queue:
                await _send_item(ws, conn, conn.queue.popleft(), timeout, metrics)
                continue
            conn.wake.clear()
            # Wake for news, or at the link's expiry (the viewer is then closed).
            left = None if link is None else max(0.0, link.expires_mono - time.monotonic())
            waiter = asyncio.ensure_future(conn.wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=left)
            finally:
                waiter.cancel()
    except TimeoutError:
        metrics.errors.labels("slow_viewer").inc()
        log.warning("slow viewer closed", extra={"session_id": s.id, "skipped": conn.skipped})
        await _quietly("close", ws.close(int(P.CloseCode.IDLE), "slow viewer: send timed out"))
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        log.debug("watch send ended", extra={"session_id": s.id, "error": repr(exc)})


async def _send_item(
    ws: WebSocket, conn: ViewerConnection, item: MediaItem, timeout: float, metrics: Metrics
) -> None:
    msg = item.message
    if msg["type"] == "withdraw":
        # Only what this viewer holds: the chunks it was sent, the video past the cut.
        seqs = [q for q in msg["seqs"] if q in conn.sent_seqs]
        if not seqs and conn.sent_end_pts <= msg["pts"] + 1e-9:
            return
        await _send_json(ws, {**msg, "seqs": seqs}, timeout)
        conn.sent_end_pts = min(conn.sent_end_pts, msg["pts"])
        return
    if item.data is None:
        await _send_json(ws, msg, timeout)
        return
    msg, data = conn.place(msg, item.data)
    await _send_json(ws, msg, timeout)
    await _bounded(ws.send_bytes(data), timeout)
    conn.sent_seqs.append(item.seq)
    conn.sent_end_pts = max(conn.sent_end_pts, msg["pts"] + msg["duration"])
    metrics.viewer_bytes_sent.inc(len(data))


async def _receiver(
    state: AppState, ws: WebSocket, s: Session, conn: ViewerConnection, sender: asyncio.Task
) -> None:
    m, settings = state.manager, state.settings
    assert m is not None
    bucket = TokenBucket(settings.ws_message_rate, 2 * settings.ws_message_rate)
    async for msg in incoming(ws, sender, s, "watch"):
        if conn.closing:
            continue
        if not bucket.take():
            conn.dropped += 1
            if conn.dropped >= settings.ws_flood_limit:
                state.metrics.errors.labels("flood").inc()
                err = P.ErrorMessage(
                    code=P.ErrorCode.RATE_LIMITED,
                    fatal=True,
                    message=f"more than {settings.ws_message_rate:g} messages per second; closing this connection",
                )
                conn.push_control(err.model_dump())
                conn.close_after_flush(int(P.CloseCode.RATE_LIMITED), "too many messages")
            continue
        data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
        parsed = P.parse_client_message(data if data is not None else "", m.limits)
        if isinstance(parsed, P.ProtocolError):
            _error(state, conn, parsed.code, parsed.message, parsed.ref)
        elif isinstance(parsed, P.PingMessage):
            conn.push_control(P.PongMessage(server_time=time.time(), ref=parsed.ref).model_dump())
        elif isinstance(parsed, P.PlayheadMessage):
            pass  # a viewer's player does not place the owner's cuts
        else:
            _error(
                state,
                conn,
                P.ErrorCode.FORBIDDEN,
                f"a viewer cannot send {parsed.type!r}: only the session's owner can",
                parsed.ref,
            )


def _error(
    state: AppState, conn: ViewerConnection, code: str, message: str, ref: str | None
) -> None:
    """A non-fatal error for one bad message; past the abuse limit, close the connection."""
    state.metrics.errors.labels("client_" + code).inc()
    conn.errors += 1
    if conn.errors >= state.settings.abuse_limit:
        err = P.ErrorMessage(
            code=P.ErrorCode.TOO_MANY_ERRORS,
            fatal=True,
            message=f"{conn.errors} bad messages; closing this connection",
        )
        conn.push_control(err.model_dump())
        conn.close_after_flush(int(P.CloseCode.BAD_MESSAGE), "too many bad messages")
        return
    conn.push_control(P.ErrorMessage(code=code, message=message, fatal=False, ref=ref).model_dump())
