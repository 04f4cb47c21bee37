"""Async Python client of the ShotStream server (protocol v1, `docs/design/protocol.md`).

`ShotStreamClient` speaks REST and hands out `Session` handles; a session's `stream()` is an
async iterator of typed events (each `chunk` paired with its fMP4 segment) that reconnects
and resumes after a dropped connection. `watch(url)` gives a read-only handle on someone
else's session from its watch link; `Session.download_recording` saves its recording.
Every error reply raises a `ShotStreamError` subclass. Built on `server.protocol` only:
importing this module never imports torch.

    async with ShotStreamClient("http://127.0.0.1:8000") as client:
        session = await client.create_session("a red fox in the snow", shots=["wide shot"])
        async with session:
            async for event in session.stream():
                if isinstance(event, Chunk) and event.seq == 3:
                    await session.prompt("close-up of the fox")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeAlias
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from server import protocol as P

Mode: TypeAlias = Literal["cut", "queue"]

# Media segments of the real model are a few hundred KiB; bound frames well above that.
MAX_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_GRACE_S = 30.0  # the server's default session grace, when a session's own is unknown


# ------------------------------------------------------------------------------- errors


class ShotStreamError(Exception):
    """An error reply or stream failure: HTTP `status` (None on the stream), `code`, `message`."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = " ".join(str(x) for x in (self.status, self.code) if x is not None)
        return f"{where}: {self.message}" if where else self.message


class Unauthorized(ShotStreamError):
    """401: missing or wrong API key or session token."""


class NotFound(ShotStreamError):
    """404: no such session for this token (or it has ended, on the stream)."""


class Conflict(ShotStreamError):
    """409: not possible in the session's state (ended, not paused), or already connected."""


class Forbidden(ShotStreamError):
    """403: a watch link's token asked for what only the session's owner may do."""


class InvalidRequest(ShotStreamError):
    """422 (or 400/413): bad input; `message` is the server's explanation."""


class RateLimited(ShotStreamError):
    """429: over this client's quota or rate; wait `retry_after` seconds."""


class Overloaded(ShotStreamError):
    """503: the server cannot take one more session now (or is starting or draining)."""


class ServerError(ShotStreamError):
    """Any other 5xx reply."""


class SessionFailed(ShotStreamError):
    """A fatal `error` on the stream (`code`: session_failed, out_of_memory, ...)."""


class ConnectionLost(ShotStreamError):
    """The stream dropped and could not be resumed, or dropped before a request's answer."""


class NotConnected(ShotStreamError):
    """The call needs an open stream connection (`Session.connect()` or `stream()`)."""


class ProtocolViolation(ShotStreamError):
    """The server broke the wire contract (e.g. a binary frame no message announced)."""


_BY_STATUS: dict[int, type[ShotStreamError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
    503: Overloaded,
}
_C = P.ErrorCode
_BY_CODE: dict[str, type[ShotStreamError]] = {
    _C.UNAUTHORIZED: Unauthorized,
    _C.UNKNOWN_SESSION: NotFound,
    _C.UNKNOWN_VIEWER: NotFound,
    _C.NO_RECORDING: NotFound,
    _C.FORBIDDEN: Forbidden,
    _C.VIEWER_LIMIT: Overloaded,
    _C.ALREADY_CONNECTED: Conflict,
    _C.REPLACED: Conflict,
    _C.INVALID_STATE: Conflict,
    _C.RATE_LIMITED: RateLimited,
    _C.OVER_CAPACITY: Overloaded,
    _C.DRAINING: Overloaded,
    **dict.fromkeys(
        (
            _C.BAD_JSON,
            _C.BAD_MESSAGE,
            _C.UNKNOWN_TYPE,
            _C.MESSAGE_TOO_LARGE,
            _C.BINARY_NOT_ALLOWED,
            _C.PROMPT_TOO_LONG,
            _C.PROMPT_TOO_MANY_TOKENS,
            _C.TOO_MANY_SHOTS,
        ),
        InvalidRequest,
    ),
}
# Fatal codes that say "not this session / not now" rather than "the session broke".
_REFUSAL_CODES = {
    _C.UNAUTHORIZED,
    _C.UNKNOWN_SESSION,
    _C.ALREADY_CONNECTED,
    _C.REPLACED,
    _C.OVER_CAPACITY,
    _C.DRAINING,
    _C.FORBIDDEN,
    _C.VIEWER_LIMIT,
}
_CLOSE_CODES = {int(c): c for c in P.CloseCode}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(resp: httpx.Response) -> ShotStreamError:
    """The exception for an HTTP error reply, with the server's `detail` and `code`."""
    detail, code = resp.reason_phrase or f"HTTP {resp.status_code}", None
    with contextlib.suppress(ValueError):
        body = P.ErrorBody.model_validate(resp.json())
        detail, code = body.detail, body.code
    cls = _BY_STATUS.get(resp.status_code)
    if cls is None:
        cls = ServerError if resp.status_code >= 500 else ShotStreamError
    return cls(
        detail,
        status=resp.status_code,
        code=code,
        retry_after=parse_retry_after(resp.headers.get("retry-after")),
    )


def error_from_message(msg: P.ErrorMessage) -> ShotStreamError:
    """The exception for an `error` message: a fatal one is SessionFailed unless it refuses
    the connection itself (unauthorized, unknown session, already connected, busy)."""
    if msg.fatal and msg.code not in _REFUSAL_CODES:
        return SessionFailed(msg.message, code=msg.code)
    return _BY_CODE.get(msg.code, ShotStreamError)(msg.message, code=msg.code)


# ------------------------------------------------------------------------------ policies


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a refused session creation (429/503) after the server's Retry-After, bounded."""

    max_attempts: int = 5
    max_wait_s: float = 60.0  # total time spent waiting across attempts
    default_delay_s: float = 1.0  # when a refusal carries no Retry-After
    max_delay_s: float = 30.0  # cap on one wait, whatever the header says
    on_retry: Callable[[ShotStreamError, float], None] | None = None  # (refusal, delay)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a dropped stream is resumed: exponential backoff within a window."""

    enabled: bool = True
    window_s: float | None = None  # None: the session's grace period (30 s if unknown)
    initial_delay_s: float = 0.1
    max_delay_s: float = 2.0


# -------------------------------------------------------------------------------- events


def _now() -> float:
    return time.monotonic()


@dataclass(frozen=True)
class Hello:
    """A stream connection opened (first message of each connection)."""

    message: P.HelloMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Init:
    """The fMP4 initialization segment; `repeat`: identical to one already received."""

    data: bytes = field(repr=False)
    repeat: bool = False
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Chunk:
    """One generated chunk: its announcement and its fMP4 media segment."""

    message: P.ChunkMessage
    data: bytes = field(repr=False)
    received: float = field(default_factory=_now)

    @property
    def seq(self) -> int:
        return self.message.seq

    @property
    def shot(self) -> int:
        return self.message.shot

    @property
    def shot_id(self) -> int:
        return self.message.shot_id

    @property
    def frames(self) -> int:
        return self.message.frames

    @property
    def duration(self) -> float:
        return self.message.duration


@dataclass(frozen=True)
class Shot:
    """A new shot begins at `message.starts_at_seq` (comes before that chunk)."""

    message: P.ShotMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class PromptAck:
    """A prompt was acknowledged, or a queued prompt moved to a new `starts_at_seq`."""

    message: P.PromptAckMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class PromptDropped:
    """An acknowledged prompt that will never be shown."""

    message: P.PromptDroppedMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Withdraw:
    """Instant cuts (`features=("withdraw",)`): chunks already received will not be played.
    Remove the media from `message.pts` on; the next chunk continues the timeline there."""

    message: P.WithdrawMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Queued:
    """The session waits in the server's waiting room (created with `wait=True`): its place
    (`message.position`, 1 = next) and estimate. A Hello follows once it starts."""

    message: P.QueuedMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Viewers:
    """How many viewers watch the session now (viewers, and owners asking for it)."""

    message: P.ViewersMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Skipped:
    """A viewer fell behind: chunks `message.seqs` will not come; the next is `next_seq`."""

    message: P.SkippedMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Pong:
    """Answer to a ping."""

    message: P.PongMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Error:
    """A non-fatal error the server reported (fatal ones raise instead)."""

    message: P.ErrorMessage
    received: float = field(default_factory=_now)


@dataclass(frozen=True)
class Ended:
    """The session ended normally (`reason`: stopped, deleted, expired, draining, ...)."""

    message: P.EndedMessage
    received: float = field(default_factory=_now)

    @property
    def reason(self) -> str:
        return self.message.reason


@dataclass(frozen=True)
class Reconnected:
    """The stream dropped and was resumed; a fresh Hello and Init follow."""

    attempts: int
    downtime_s: float
    last_seq: int | None  # the last chunk received before the drop
    received: float = field(default_factory=_now)


Event: TypeAlias = (
    Hello
    | Init
    | Chunk
    | Shot
    | PromptAck
    | PromptDropped
    | Withdraw
    | Queued
    | Viewers
    | Skipped
    | Pong
    | Error
    | Ended
    | Reconnected
)


# ------------------------------------------------------------------------------- session


@dataclass
class _Waiter:
    """A request on the stream awaiting the answer that echoes its `ref`."""

    kind: Literal["prompt", "ping", "barrier"]
    future: asyncio.Future
    ref: str = ""


class Session:
    """Handle on one server session: its status, prompts, controls and event stream.

    Whoever needs the next frame reads it (the `stream()` consumer, or a `prompt()` waiting
    for its ack), so a prompt sent from inside the `async for` loop never deadlocks, and
    frames are read only as fast as they are consumed (the server's outbox applies
    backpressure; nothing buffers without bound here)."""

    def __init__(
        self,
        client: ShotStreamClient,
        session_id: str,
        token: str,
        stream_url: str,
        info: P.CreateSessionResponse | None = None,
        reconnect: ReconnectPolicy | None = None,
        grace_s: float | None = None,
        features: tuple[str, ...] = (),
        role: Literal["owner", "viewer"] = "owner",
    ) -> None:
        self.session_id = session_id
        # "viewer": a watch link's read-only handle (no prompts, pause or stop; `stop()`
        # and closing only leave).
        self.role = role
        # Optional protocol features asked for on every connection (e.g. "withdraw"); the
        # server lists in `hello.features` those it enabled (`self.features` after it).
        self.requested_features = tuple(features)
        self.features: tuple[str, ...] = ()
        self.token = token
        self.stream_url = stream_url
        self.info = info
        self.reconnect_policy = reconnect or ReconnectPolicy()
        self.grace_s = grace_s
        self.reconnects = 0
        self.ended: str | None = None  # the `ended` reason, once the session ended
        self.last_seq: int | None = None
        self._client = client
        self._ws: ClientConnection | None = None
        self._opened = False  # a connection was opened (so a missing one means "dropped")
        self._events: deque[Event] = deque()
        self._read_lock = asyncio.Lock()
        self._tick: asyncio.Future | None = None  # done after each read, for waiting requests
        self._waiters: deque[_Waiter] = deque()
        self._refs = 0  # counter of `ref`s given to requests on the stream
        self._announced: P.InitMessage | P.ChunkMessage | None = None
        self._init: bytes | None = None
        self._dropped_at: float | None = None
        # None while live; True after a normal end or close(); the error after a fatal one.
        self._finished: bool | ShotStreamError | None = None

    def __repr__(self) -> str:
        return f"Session({self.session_id!r})"

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """A stream connection is open now (not dropped, not reconnecting, not finished)."""
        return self._ws is not None and self._finished is None

    # -- REST ---------------------------------------------------------------------------
    async def status(self) -> P.SessionStatus:
        """`GET /v1/sessions/{id}`."""
        data = await self._client._request("GET", self._path(), token=self.token)
        return P.SessionStatus.model_validate(data)

    async def delete(self) -> None:
        """`DELETE /v1/sessions/{id}`: ends the session and frees it at once."""
        await self._client._request("DELETE", self._path(), token=self.token)

    def _path(self) -> str:
        return f"/v1/sessions/{quote(self.session_id, safe='')}"

    # -- watch links and the recording (docs/design/protocol.md §15–§16) ----------------------
    async def create_viewer(self, ttl_s: float | None = None) -> P.ViewerLink:
        """Mint a watch link: `watch_url` (the page) and `stream_url` + `token` for viewers."""
        body = {"ttl_s": ttl_s} if ttl_s is not None else None
        data = await self._client._request(
            "POST", self._path() + "/viewers", token=self.token, json=body
        )
        return P.ViewerLink.model_validate(data)

    async def revoke_viewer(self, viewer_id: str) -> None:
        """Revoke a watch link: its viewers are closed and its token stops working."""
        path = f"{self._path()}/viewers/{quote(viewer_id, safe='')}"
        await self._client._request("DELETE", path, token=self.token)

    async def timeline(self) -> dict[str, Any]:
        """The recording's shot timeline (`timeline.json`)."""
        return await self._client._request("GET", self._path() + "/timeline.json", token=self.token)

    async def download_recording(self, path: Path | str) -> str:
        """Save the recording (a progressive MP4) to `path`; returns its state: `recording`,
        `complete` or `incomplete`. Written to `path.partial`, then renamed."""
        return await self._client._download(self._path() + "/recording.mp4", self.token, Path(path))

    # -- requests ---------------------------------------------------------------------------
    async def prompt(
        self, text: str, mode: Mode | None = None, timeout: float | None = 30.0
    ) -> P.PromptAccepted:
        """A new shot prompt: over the stream when connected (returns on its `prompt_ack`),
        else `POST .../prompts`. Raises InvalidRequest, RateLimited, Conflict, ..."""
        body: dict[str, Any] = {"prompt": text} | ({"mode": mode} if mode else {})
        if self.connected:
            ack = await self._request("prompt", [{"type": "prompt", **body}], timeout)
            return P.PromptAccepted(
                shot_id=ack.shot_id,
                starts_at_seq=ack.starts_at_seq,
                truncated_tokens=ack.truncated_tokens,
            )
        data = await self._client._request(
            "POST", self._path() + "/prompts", token=self.token, json=body
        )
        return P.PromptAccepted.model_validate(data)

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Round trip of a `ping` over the stream connection, in seconds."""
        t0 = time.perf_counter()
        await self._request("ping", [{"type": "ping"}], timeout)
        return time.perf_counter() - t0

    async def pause(self, timeout: float | None = 10.0) -> None:
        """Pause generation (stream connection needed: the protocol has no REST route)."""
        await self._request("barrier", [{"type": "pause"}, {"type": "ping"}], timeout)

    async def resume(self, timeout: float | None = 10.0) -> None:
        """Resume a paused session; Conflict if it is not paused."""
        await self._request("barrier", [{"type": "resume"}, {"type": "ping"}], timeout)

    async def report_playhead(self, pts: float) -> None:
        """Instant cuts: tell the server where the player is (media seconds). No answer;
        a value the server did not send comes back as an Error event."""
        if self.connected and "withdraw" in self.features:
            assert self._ws is not None
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"type": "playhead", "pts": round(pts, 4)}))

    async def stop(self) -> None:
        """End the session: `stop` over the stream (which then yields Ended), else DELETE.
        A viewer cannot end it: it only closes its connection."""
        if self.role == "viewer":
            await self.close()
            return
        if self.connected:
            assert self._ws is not None
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"type": "stop"}))
                return
        await self.delete()

    async def _request(
        self,
        kind: Literal["prompt", "ping", "barrier"],
        messages: list[dict[str, Any]],
        timeout: float | None,
    ) -> Any:
        if not self.connected:
            raise NotConnected(
                f"{messages[0]['type']} needs the stream connection; call connect() or iterate stream() first"
            )
        assert self._ws is not None
        self._refs += 1
        ref = f"c{self._refs}"
        waiter = _Waiter(kind, asyncio.get_running_loop().create_future(), ref)
        # The server echoes `ref` in the ack, pong or error answering a message, so answers
        # pair with requests exactly (acks of REST prompts and re-acks carry none).
        self._waiters.append(waiter)
        try:
            for msg in messages:
                await self._ws.send(json.dumps({**msg, "ref": ref}))
        except ConnectionClosed as exc:
            waiter.future.cancel()
            raise ConnectionLost(f"the stream dropped while sending {kind}: {exc}") from exc
        return await self._wait(waiter.future, timeout)

    async def _wait(self, fut: asyncio.Future, timeout: float | None) -> Any:
        async def drive() -> Any:
            while not fut.done():
                if self._read_lock.locked():  # another task reads; it will answer us
                    if self._tick is None or self._tick.done():
                        self._tick = asyncio.get_running_loop().create_future()
                    await asyncio.wait({fut, self._tick}, return_when=asyncio.FIRST_COMPLETED)
                else:
                    async with self._reading():
                        if not fut.done():
                            await self._pump()
            return fut.result()

        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as its operation completes
            async with asyncio.timeout(timeout):
                return await drive()
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer from the server in {timeout} s") from None

    # -- the stream ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Hold the read lock; on release, wake requests waiting for another reader."""
        async with self._read_lock:
            try:
                yield
            finally:
                if self._tick is not None and not self._tick.done():
                    self._tick.set_result(None)

    async def connect(self) -> None:
        """Open the stream connection (a no-op when open); raises the server's refusal."""
        async with self._reading():
            if self._ws is not None or self._dropped_at is not None or self.ended is not None:
                return  # open, resuming, or over (an ended session has nothing to stream)
            ws, hello = await self._open()
            self._ws, self._opened = ws, True
            self._finished, self._announced = None, None
            self._events.append(hello)

    async def close(self) -> None:
        """Close the stream connection without ending the session (see `stop`)."""
        if self._finished is None:
            self._finished = True
        self._fail_waiters(ConnectionLost("the stream was closed"))
        ws, self._ws = self._ws, None
        self._dropped_at = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def stream(self) -> AsyncIterator[Event]:
        """Every event of the stream in order, until it ends (normally: after Ended).
        Fatal errors raise (SessionFailed, ...); a dropped connection is resumed
        (Reconnected) or raises ConnectionLost."""
        await self.connect()
        while (event := await self.next_event()) is not None:
            yield event

    async def next_event(self) -> Event | None:
        """The next event, or None once the stream ended; raises on a fatal error."""
        while True:
            if self._events:
                return self._events.popleft()
            if self._finished is not None:
                ws, self._ws = self._ws, None
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
                if self._finished is True:
                    return None
                raise self._finished  # type: ignore[misc]
            if not self._opened:
                await self.connect()
                continue
            async with self._reading():
                if not self._events and self._finished is None:
                    await self._pump()

    async def _open(self) -> tuple[ClientConnection, Hello | Queued]:
        """Connect and read `hello`; the server's refusal raises its mapped error."""
        timeout = self._client.timeout
        # On a resume, name the last chunk we have: the server sends again what it kept after it.
        query = []
        if self.requested_features:
            query.append("features=" + ",".join(self.requested_features))
        if self.last_seq is not None:
            query.append(f"last_seq={self.last_seq}")
        url = self.stream_url + ("?" + "&".join(query) if query else "")
        try:
            ws = await connect(
                url,
                additional_headers={
                    **self._client.headers,
                    "Authorization": f"Bearer {self.token}",
                },
                max_size=MAX_FRAME_BYTES,
                compression=None,
                open_timeout=timeout,
                ping_interval=5,
                ping_timeout=10,
                close_timeout=2,
            )
        except InvalidStatus as exc:  # refused before the upgrade (e.g. by a proxy)
            r = exc.response
            cls = _BY_STATUS.get(r.status_code, ServerError)
            raise cls(
                f"stream refused: HTTP {r.status_code}",
                status=r.status_code,
                retry_after=parse_retry_after(r.headers.get("Retry-After")),
            ) from exc
        try:
            async with asyncio.timeout(timeout):
                raw = await ws.recv()
            msg = P.parse_server_message(raw) if isinstance(raw, str) else None
            if isinstance(msg, P.ErrorMessage):
                raise error_from_message(msg)
            if isinstance(msg, P.QueuedMessage):  # in the waiting room: hello comes later
                return ws, Queued(msg)
            if not isinstance(msg, P.HelloMessage):
                raise ProtocolViolation(f"expected hello, got {str(raw)[:80]!r}")
            if msg.protocol != P.PROTOCOL_VERSION:
                raise ProtocolViolation(
                    f"server speaks protocol {msg.protocol}; this client speaks {P.PROTOCOL_VERSION}"
                )
            self.features = tuple(msg.features)
        except ConnectionClosed as exc:
            raise ConnectionLost(f"stream closed before hello: {exc}") from exc
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws, Hello(msg)

    async def _pump(self) -> None:
        """Read one frame (or resume a dropped connection) and queue what it means.
        Called with the read lock held; safe to cancel (recv is, and state is kept)."""
        if self._ws is None:
            await self._resume()
            return
        try:
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            self._on_closed(exc)
            return
        try:
            self._handle(raw)
        except ProtocolViolation as exc:
            self._finish(exc)

    def _handle(self, raw: str | bytes) -> None:
        if self._announced is not None:
            ann, self._announced = self._announced, None
            if not isinstance(raw, bytes) or len(raw) != ann.bytes:
                got = f"{len(raw)} bytes" if isinstance(raw, bytes) else "a text frame"
                raise ProtocolViolation(f"{ann.type} announced {ann.bytes} bytes; got {got}")
            if isinstance(ann, P.InitMessage):
                self._events.append(Init(raw, repeat=self._init == raw))
                self._init = self._init or raw
            else:
                self.last_seq = ann.seq
                self._events.append(Chunk(ann, raw))
            return
        if isinstance(raw, bytes):
            raise ProtocolViolation(f"a binary frame ({len(raw)} bytes) no message announced")
        msg = P.parse_server_message(raw)
        if isinstance(msg, P.ProtocolError):
            if msg.code == P.ErrorCode.UNKNOWN_TYPE:
                return  # a message type from a newer server: skip it
            raise ProtocolViolation(msg.message)
        if isinstance(msg, P.InitMessage | P.ChunkMessage):
            self._announced = msg
        elif isinstance(msg, P.PromptAckMessage):
            self._answer(msg.ref, msg)
            self._events.append(PromptAck(msg))
        elif isinstance(msg, P.PongMessage):
            self._answer(msg.ref, msg)
            self._events.append(Pong(msg))
        elif isinstance(msg, P.ErrorMessage):
            if msg.fatal:
                self._finish(error_from_message(msg))
            elif not self._answer(msg.ref, error_from_message(msg)):
                self._events.append(Error(msg))
        elif isinstance(msg, P.EndedMessage):
            self.ended = msg.reason
            self._events.append(Ended(msg))
            self._finish(True)
        elif isinstance(msg, P.HelloMessage):
            self.features = tuple(msg.features)
            self._events.append(Hello(msg))
        elif isinstance(msg, P.WithdrawMessage):
            if msg.seqs and self.last_seq is not None and self.last_seq >= min(msg.seqs):
                self.last_seq = min(msg.seqs) - 1  # we no longer hold them
            self._events.append(Withdraw(msg))
        elif isinstance(msg, P.ShotMessage):
            self._events.append(Shot(msg))
        elif isinstance(msg, P.PromptDroppedMessage):
            self._events.append(PromptDropped(msg))
        elif isinstance(msg, P.QueuedMessage):
            self._events.append(Queued(msg))
        elif isinstance(msg, P.ViewersMessage):
            self._events.append(Viewers(msg))
        elif isinstance(msg, P.SkippedMessage):
            self._events.append(Skipped(msg))

    def _answer(self, ref: str | None, result: Any) -> bool:
        """Settle the waiter whose message carried `ref` (an exception fails it)."""
        for w in self._waiters:
            if ref is not None and w.ref == ref:
                self._waiters.remove(w)
                if not w.future.done():
                    if isinstance(result, BaseException):
                        w.future.set_exception(result)
                    else:
                        w.future.set_result(result)
                return True
        return False

    def _finish(self, how: bool | ShotStreamError) -> None:
        if self._finished is None:
            self._finished = how
        reason = how if isinstance(how, ShotStreamError) else Conflict("the session ended")
        self._fail_waiters(reason)

    def _fail_waiters(self, exc: ShotStreamError) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.future.done():
                w.future.set_exception(exc)

    def _on_closed(self, exc: ConnectionClosed) -> None:
        """The connection closed: the end, a refusal, or a drop to resume."""
        self._ws, self._announced = None, None
        if self._finished is not None:
            return  # after `ended`, a fatal error or close(): nothing more to read
        code = exc.rcvd.code if exc.rcvd else None
        reason = exc.rcvd.reason if exc.rcvd else ""
        final = {
            P.CloseCode.UNAUTHORIZED: Unauthorized,
            P.CloseCode.UNKNOWN_SESSION: NotFound,
            P.CloseCode.BAD_MESSAGE: SessionFailed,
            P.CloseCode.SESSION_FAILED: SessionFailed,
            P.CloseCode.DRAINING: Overloaded,
            P.CloseCode.REPLACED: Conflict,
            P.CloseCode.RATE_LIMITED: RateLimited,
        }
        if code in _CLOSE_CODES and _CLOSE_CODES[code] in final:
            cls = final[_CLOSE_CODES[code]]
            self._finish(cls(reason or f"stream closed with code {code}", code=str(code)))
            return
        # Dropped (no close frame, or a close without `ended` such as 4408 slow reader):
        # the session lives on for its grace period, so resume it.
        self._fail_waiters(
            ConnectionLost(
                "the stream dropped before the server answered; the request may or may not have been applied"
            )
        )
        if not self.reconnect_policy.enabled:
            self._finish(ConnectionLost(f"the stream dropped (close code {code})"))
            return
        self._dropped_at = time.monotonic()

    async def _resume(self) -> None:
        """Reconnect with backoff within the grace window; queue Reconnected + Hello."""
        policy = self.reconnect_policy
        started = self._dropped_at if self._dropped_at is not None else time.monotonic()
        window = policy.window_s or self.grace_s or DEFAULT_GRACE_S
        delay, attempts = policy.initial_delay_s, 0
        while self._finished is None:  # close() ends the attempts
            attempts += 1
            try:
                ws, hello = await self._open()
            except (
                OSError,
                TimeoutError,
                InvalidHandshake,
                ConnectionLost,
                Conflict,
                Overloaded,
                ServerError,
            ) as exc:
                # Transient: the network, a restarting server, or one that has not yet
                # noticed the old connection is gone (409/4009 already connected).
                last: BaseException = exc
            except ShotStreamError as exc:  # the session ended meanwhile, or is not ours
                self._finish(
                    ConnectionLost(
                        f"the stream dropped and the session cannot be resumed: {exc.message}",
                        code=exc.code,
                    )
                )
                return
            else:
                if self._finished is not None:  # closed while connecting
                    await ws.close()
                    return
                now = time.monotonic()
                self._ws, self._dropped_at, self._announced = ws, None, None
                self.reconnects += 1
                self._events.append(Reconnected(attempts, now - started, self.last_seq))
                self._events.append(hello)
                return
            elapsed = time.monotonic() - started
            if elapsed + delay > window:
                self._finish(
                    ConnectionLost(
                        f"the stream dropped and {attempts} reconnect attempts in {elapsed:.1f} s failed; last: {last}"
                    )
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)


# -------------------------------------------------------------------------------- client


class ShotStreamClient:
    """The server's REST API; `create_session` and `attach` return `Session` handles."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.reconnect = reconnect or ReconnectPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=headers or {}
        )
        self.headers = dict(headers or {})

    async def __aenter__(self) -> ShotStreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool (sessions stay on the server)."""
        await self._http.aclose()

    async def create_session(
        self,
        prompt: str,
        shots: list[str] | None = None,
        seed: int | None = None,
        mode: Mode | None = None,
        retry: bool | RetryPolicy = False,
        features: tuple[str, ...] = (),
        wait: bool = False,
    ) -> Session:
        """`POST /v1/sessions`; with `retry`, a 429/503 is retried after its Retry-After.
        `features` are asked for on the stream (e.g. ("withdraw",) for instant cuts). With
        `wait`, a full server queues the session (`session.info.state == "queued"`): its
        stream yields Queued events, then Hello once it starts."""
        body: dict[str, Any] = {"prompt": prompt} | ({"wait": True} if wait else {})
        for key, value in (("shots", shots), ("seed", seed), ("mode", mode)):
            if value is not None:
                body[key] = value
        policy = RetryPolicy() if retry is True else retry or None
        attempts, waited = 0, 0.0
        while True:
            attempts += 1
            try:
                data = await self._request("POST", "/v1/sessions", json=body, api_key=True)
                break
            except (RateLimited, Overloaded) as exc:
                if policy is None or attempts >= policy.max_attempts:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else policy.default_delay_s
                delay = min(delay, policy.max_delay_s)
                if waited + delay > policy.max_wait_s:
                    raise
                if policy.on_retry is not None:
                    policy.on_retry(exc, delay)
                await asyncio.sleep(delay)
                waited += delay
        info = P.CreateSessionResponse.model_validate(data)
        # The session lives this long without a stream: the window to resume a dropped one.
        return Session(
            self,
            info.session_id,
            info.token,
            info.stream_url,
            info,
            self.reconnect,
            grace_s=info.grace_s,
            features=features,
        )

    def attach(
        self,
        session_id: str,
        token: str,
        stream_url: str | None = None,
        features: tuple[str, ...] = (),
    ) -> Session:
        """A handle on an existing session (its id and token), e.g. to resume watching it."""
        if stream_url is None:
            parts = urlsplit(self.base_url)
            scheme = "wss" if parts.scheme == "https" else "ws"
            path = f"{parts.path}/v1/sessions/{quote(session_id, safe='')}/stream"
            stream_url = urlunsplit((scheme, parts.netloc, path, "", ""))
        return Session(self, session_id, token, stream_url, None, self.reconnect, features=features)

    def watch(self, url: str, token: str | None = None, features: tuple[str, ...] = ()) -> Session:
        """A read-only handle on someone else's session, from its watch link (`watch_url`
        or `stream_url`; `token` if the URL does not carry it)."""
        link = parse_watch_url(url)
        token = token or link.token
        if not token:
            raise InvalidRequest("the watch link carries no token: give it with token=")
        return Session(
            self,
            link.session_id,
            token,
            link.stream_url,
            None,
            self.reconnect,
            features=features,
            role="viewer",
        )

    async def models(self) -> P.ModelInfo:
        """`GET /v1/models`: the loaded preset, its sizes and fps."""
        return P.ModelInfo.model_validate(await self._request("GET", "/v1/models"))

    async def ready(self) -> bool:
        """`GET /readyz`: True once the server is warmed up and not draining."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        api_key: bool = False,
    ) -> Any:
        headers = {}
        bearer = token if token is not None else (self.api_key if api_key else None)
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            resp = await self._http.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ShotStreamError(
                f"{method} {path}: no reply in {self.timeout} s", code="timeout"
            ) from exc
        except httpx.TransportError as exc:
            raise ShotStreamError(
                f"{method} {path}: cannot reach {self.base_url}: {exc}", code="unreachable"
            ) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp)
        return resp.json() if resp.content else None

    async def _download(self, path: str, token: str, out: Path) -> str:
        """GET `path` into `out` (via `out.partial`); returns X-Recording-State."""
        partial = out.with_name(out.name + ".partial")
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with self._http.stream("GET", path, headers=headers, timeout=None) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                with open(partial, "wb") as f:
                    async for chunk in resp.aiter_bytes():
                        f.write(chunk)
                state = resp.headers.get("x-recording-state", "")
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise ShotStreamError(
                f"GET {path}: cannot reach {self.base_url}: {exc}", code="unreachable"
            ) from exc
        partial.replace(out)
        return state


class WatchLink(NamedTuple):
    """What a watch link names: the server, the session, the link's token, the stream."""

    base_url: str
    session_id: str
    token: str | None
    stream_url: str


def parse_watch_url(url: str) -> WatchLink:
    """A watch link in any of its forms: the page's `http(s)://host/?watch=<id>#token=<t>`,
    the viewers' stream `ws(s)://host/v1/sessions/<id>/watch?token=<t>`, or any
    `http(s)://host/v1/sessions/<id>[/...]` (then the token is given apart)."""
    parts = urlsplit(url)
    http = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    ws = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if http not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"not a watch link: {url!r}")
    query, fragment = parse_qs(parts.query), parse_qs(parts.fragment)
    token = (fragment.get("token") or query.get("token") or [None])[0]
    if "watch" in query:
        sid, prefix = query["watch"][0], parts.path.rstrip("/")
        if prefix.endswith(".html"):  # the page by its file name
            prefix = prefix.rsplit("/", 1)[0]
    elif m := re.fullmatch(r"(?P<prefix>.*)/v1/sessions/(?P<sid>[^/]+)(/.*)?", parts.path):
        sid, prefix = unquote(m["sid"]), m["prefix"]
    else:
        raise InvalidRequest(f"not a watch link (no session in it): {url!r}")
    stream = f"{prefix}/v1/sessions/{quote(sid, safe='')}/watch"
    return WatchLink(
        urlunsplit((http, parts.netloc, prefix, "", "")),
        sid,
        token,
        urlunsplit((ws, parts.netloc, stream, "", "")),
    )
