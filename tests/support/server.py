"""A real `shotstream serve` process on 127.0.0.1 for end-to-end tests, and a raw
protocol-level stream reader (tests check the wire, not our client library)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

from clients.stats import Playout

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server.cli serve` with the given settings; stops with SIGTERM."""

    def __init__(self, tmp: Path, open_files: int | None = None, **settings):
        """`open_files`: the process's open-file limit (RLIMIT_NOFILE), if not inherited."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        defaults = {"preset": "tiny", "threads": 1, "log_level": "info"}
        for key, value in {**defaults, **settings}.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False:
                args.append("--no-" + key.replace("_", "-"))
            else:
                args += [flag, str(value)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        limit = (open_files, open_files)
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=None
            if open_files is None
            else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
        )
        self.returncode: int | None = None
        self.api_key: str | None = settings.get("api_key")  # sent by `create`

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.returncode = self.proc.returncode
        return self.returncode

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        want = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 30.0, labels=None) -> float:
        deadline = time.monotonic() + timeout
        got = self.metric(name, labels)
        while got != value and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.metric(name, labels)
        return got

    def delete(self, d: dict) -> None:
        """End a session made by `create` (DELETE with its token); gone already is fine."""
        httpx.delete(
            f"{self.base}/v1/sessions/{d['session_id']}",
            headers={"Authorization": f"Bearer {d['token']}"},
            timeout=30,
        )

    def create(self, **body) -> dict:
        body.setdefault("prompt", "a red circle on a blue background")
        key = {"X-API-Key": self.api_key} if self.api_key else {}
        r = httpx.post(self.base + "/v1/sessions", json=body, headers=key, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()


@dataclass
class Chunk:
    message: dict
    data: bytes


@dataclass
class Stream:
    """What a client saw on one stream connection, in order."""

    messages: list[dict] = field(default_factory=list)
    init: bytes = b""
    chunks: list[Chunk] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    def video(self) -> bytes:
        return self.init + b"".join(c.data for c in self.chunks)


async def recv_within(ws, timeout: float):
    """`ws.recv()` for at most `timeout` seconds (TimeoutError past it). Not asyncio.wait_for:
    on Python 3.11 it swallows a cancellation that arrives as a message does, and a reading
    task cancelled at that moment reads on (a test awaiting it then waits forever)."""
    async with asyncio.timeout(timeout):
        return await ws.recv()


class StreamClient:
    """A raw WebSocket reader: pairs each announcement with its binary frame."""

    def __init__(self, url: str, token: str | None):
        self.url = url + (f"?token={token}" if token else "")
        self.ws = None
        self.stream = Stream()

    async def __aenter__(self) -> StreamClient:
        self.ws = await websockets.connect(self.url, max_size=None)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, msg: dict | str | bytes) -> None:
        await self.ws.send(json.dumps(msg) if isinstance(msg, dict) else msg)

    async def next(self, timeout: float = 60.0) -> dict | None:
        """The next JSON message (its binary read too), or None once the server closed."""
        try:
            raw = await recv_within(self.ws, timeout)
        except websockets.ConnectionClosed as exc:
            self.stream.close_code = exc.rcvd.code if exc.rcvd else None
            self.stream.close_reason = exc.rcvd.reason if exc.rcvd else ""
            return None
        assert isinstance(raw, str), "a binary frame that no message announced"
        msg = json.loads(raw)
        self.stream.messages.append(msg)
        if msg["type"] in ("init", "chunk"):
            data = await recv_within(self.ws, timeout)
            assert isinstance(data, bytes) and len(data) == msg["bytes"]
            if msg["type"] == "init":
                self.stream.init = data
            else:
                self.stream.chunks.append(Chunk(msg, data))
        return msg

    async def until(self, pred, timeout: float = 120.0) -> dict:
        """Read until a message satisfies `pred`; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await self.next(max(0.1, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(
                    f"closed ({self.stream.close_code} {self.stream.close_reason}) "
                    f"before the awaited message; saw {self.stream.messages[-5:]}"
                )
            if pred(msg):
                return msg
        raise TimeoutError("awaited message did not come")

    async def chunks(self, n: int, timeout: float = 120.0) -> list[Chunk]:
        start = len(self.stream.chunks)
        await self.until(
            lambda m: m["type"] == "chunk" and len(self.stream.chunks) >= start + n, timeout
        )
        return self.stream.chunks[start:]

    async def closed(self, timeout: float = 30.0) -> Stream:
        deadline = time.monotonic() + timeout
        while await self.next(max(0.1, deadline - time.monotonic())) is not None:
            pass
        return self.stream


async def reconnect(url: str, timeout: float = 30) -> StreamClient:
    """A new stream connection (it takes over from an old one at once; a server before
    that answered 4009 `already_connected` until it noticed the old one was gone)."""
    deadline = time.monotonic() + timeout
    while True:
        c = StreamClient(url, None)
        await c.__aenter__()
        first = await c.next()
        if first and first["type"] == "hello":
            return c
        await c.__aexit__()
        assert first and first["code"] == "already_connected", first
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        await asyncio.sleep(0.05)


def ffprobe_frames(path: Path) -> list[dict]:
    """Decoded frames of a video file (pts_time, key_frame) by ffprobe."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_frames",
            "-show_entries",
            "frame=pts_time,key_frame,pict_type",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["frames"]


async def play_in_real_time(url: str, until: float) -> Playout:
    """A stream client that reads everything and plays it at real time from its first
    chunk, until `until` (monotonic), then stops the session; its player's stalls."""
    player = Playout(tolerance_s=0.05)
    async with websockets.connect(url, max_size=None) as ws:
        while time.monotonic() < until:
            try:
                raw = await recv_within(ws, max(0.1, until - time.monotonic()))
            except TimeoutError:
                break
            msg = json.loads(raw)
            if msg["type"] in ("init", "chunk"):
                await ws.recv()
            if msg["type"] == "chunk":
                player.on_chunk(time.monotonic(), msg["duration"])
        await ws.send(json.dumps({"type": "stop"}))
    return player
