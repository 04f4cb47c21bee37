"""A guard on uvicorn's HTTP connections: a deadline for each request to arrive, and a cap
on open connections.

uvicorn closes a connection idle between requests (keep-alive), but not one that never
completes a request: a socket that connects and sends nothing, or a request line a byte at
a time, holds a file descriptor for as long as it likes, and a few hundred of them exhaust
the process's descriptors (slowloris). Here each request must be fully received (headers
and body) within `request_timeout_s` of the connection opening, or of the request's first
byte on a kept-alive connection; and past `max_connections` open connections a new one
closes the connection that has waited longest for a complete request (slow, idle or
silent), or, when every one is busy, is answered 503 and closed itself.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Descriptors the open-file limit keeps for the server's own files (libraries, logs, the
# event loop, pipes) when `max_connections` is derived from it; a stream is one socket.
FD_RESERVE = 64
MAX_AUTO_CONNECTIONS = 4096
_BUSY_BODY = b'{"detail":"too many open connections","code":"over_capacity"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def connection_limit(setting: int) -> int:
    """`max_connections`: the setting, or (0) what the open-file limit leaves after
    FD_RESERVE descriptors, at most MAX_AUTO_CONNECTIONS."""
    if setting > 0:
        return setting
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_AUTO_CONNECTIONS + FD_RESERVE
    return max(16, min(MAX_AUTO_CONNECTIONS, soft - FD_RESERVE))


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline and a connection cap; one
    subclass per server, made by `guarded_http`."""

    request_timeout_s: float
    max_connections: int
    # Connections with no complete request in hand (arriving, or idle between requests),
    # longest waiting first: the ones a new connection may close at the cap.
    waiting: dict[GuardedHttpProtocol, None]
    on_close: Callable[[str], None]  # told the reason of every connection this guard closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.max_connections:
            oldest = next(iter(self.waiting))
            if oldest is self:  # every other connection is busy with a request or a stream
                transport.write(_BUSY)
            oldest._close("over_limit")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_request()  # a kept-alive connection's next request (the first: armed)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and self._should_upgrade():
            self._received()  # a WebSocket: its own protocol takes the socket from here
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._received()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle until its next request
            self.waiting[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._received()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self.waiting[self] = None
        if self._deadline is None:
            self._deadline = self.loop.call_later(
                self.request_timeout_s, self._close, "request_timeout"
            )

    def _received(self) -> None:
        self.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close(self, reason: str) -> None:
        self._received()
        self.connections.discard(self)  # gone for the count now; the socket closes next turn
        if not self.transport.is_closing():
            self.transport.close()
            self.on_close(reason)


def guarded_http(
    request_timeout_s: float, max_connections: int, on_close: Callable[[str], None]
) -> type[GuardedHttpProtocol]:
    """The protocol class for one server (uvicorn.Config's `http`), with its own limits
    and its own list of waiting connections."""
    attrs = {
        "request_timeout_s": request_timeout_s,
        "max_connections": max_connections,
        "waiting": {},
        "on_close": staticmethod(on_close),
    }
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), attrs)
