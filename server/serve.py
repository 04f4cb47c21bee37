"""`shotstream serve`: uvicorn around the app, with a drain on SIGTERM.

uvicorn's own shutdown closes every WebSocket at once (code 1012). We first drain: stop
admitting, fail `/readyz`, let sessions run for the grace period, end them with `ended`
(reason `draining`), and only then let uvicorn exit (status 0). A second signal exits at
once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import typing

import uvicorn
from pydantic import ValidationError

from model.config import get_preset
from server.app import create_app
from server.connections import connection_limit, guarded_http
from server.logs import setup_logging
from server.settings import Settings

log = logging.getLogger("shotstream.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before exiting."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.app_state = state
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the captured signal after shutting down, so the process would
        # die by SIGTERM; after a completed drain we exit 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        loop = self.app_state.loop
        if self._drain_task is not None or loop is None or self.app_state.manager is None:
            return super().handle_exit(sig, frame)

        async def drain_then_exit() -> None:
            try:
                await self.app_state.drain()
            finally:
                uvicorn.Server.handle_exit(self, sig, frame)

        self._drain_task = loop.create_task(drain_then_exit())


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per setting (`--lead-chunks` for `lead_chunks`); flags beat SHOTSTREAM_* variables."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        args = typing.get_args(ann)
        if ann is bool:
            p.add_argument(
                flag,
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=field.description,
            )
        elif typing.get_origin(ann) is list:
            p.add_argument(flag, dest=name, default=None, action="append", help=field.description)
        else:
            kind = next((a for a in (int, float) if ann is a or a in args), str)
            choices = list(args) if typing.get_origin(ann) is typing.Literal else None
            p.add_argument(
                flag, dest=name, default=None, type=kind, choices=choices, help=field.description
            )


def uvicorn_log_level(level: str) -> str:
    """uvicorn's loggers never go below info: it hands them to the websockets library, whose
    debug lines trace handshake headers (tokens, API keys) and frames (prompts)."""
    return "info" if level.lower() in ("debug", "trace") else level


def run_serve(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:  # name the setting and the rule, never the value (a key)
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in err["loc"])
            print(f"shotstream serve: {where}: {err['msg']}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    app = create_app(settings)
    state = app.state.shotstream
    max_connections = connection_limit(settings.max_connections)
    http = guarded_http(
        settings.http_request_timeout_s,
        max_connections,
        lambda reason: state.metrics.connections_closed.labels(reason).inc(),
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        http=http,
        log_level=uvicorn_log_level(settings.log_level),
        ws_max_size=max(1 << 20, 4 * settings.max_ws_message_bytes),
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        timeout_graceful_shutdown=2,  # after the drain: what is left is keep-alive sockets
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )
    server = DrainingServer(config, state)
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/"
    log.info(
        f"ShotStream server ({settings.preset} preset) at {url} — open it in a browser; API docs at /docs",
        extra={"url": url},
    )
    log.info(
        "connection limit",
        extra={
            "max_connections": max_connections,
            "http_request_timeout_s": settings.http_request_timeout_s,
        },
    )
    if settings.weights is None and not get_preset(settings.preset).bundled_weights:
        log.warning(f"no --weights given: the {settings.preset} preset runs with RANDOM weights")
    sockets = None
    if settings.stream_send_buffer_bytes:
        # Accepted connections inherit the listening socket's send buffer (and lose the
        # kernel's autotuning), so a stalled reader blocks our sends early.
        sock = config.bind_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.stream_send_buffer_bytes)
        sockets = [sock]
    server.run(sockets=sockets)
    return 0 if state.error is None else 1
