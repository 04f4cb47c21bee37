"""The CPU image, built from the root Dockerfile and run as a user runs it: liveness, then
readiness, the server as uid 10001 and PID 1, the image's own HEALTHCHECK, a stream of the
demo preset decoded by ffprobe, and a plain `docker stop` during a stream ending the session
with `ended` (reason `draining`) and the container with exit code 0.

It needs a Docker daemon and the base image that ./.ci/docker-up provides (`make test` runs
it): Debian's docker.io and a Debian bookworm base made with debootstrap, so no registry is
needed. The build gets this machine's CA bundle and pip configuration (tests/docker/image.py);
its layers stay in the build cache, so later runs rebuild only the code. The containers and
the image it made are removed. Timings are printed (`-s`), not asserted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import httpx
import pytest

from tests.docker.image import LocalFiles, build_pip_conf, ca_bundle, docker_cli, pip_settings
from tests.support.server import REPO, StreamClient, ffprobe_frames

BASE_IMAGE = os.environ.get("SHOTSTREAM_TEST_BASE_IMAGE", "shotstream-ci/debian:bookworm")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DOCKER_STOP_TIMEOUT_S = 10  # what `docker stop` and `docker run` give a container by default
PROMPT = "a red square on a blue background"
CPU_ENV = {"SHOTSTREAM_PRESET": "demo", "SHOTSTREAM_WEIGHTS": ""}  # as compose.cpu.yaml

pytestmark = pytest.mark.timeout(1200)  # a first build downloads torch and the dependencies


def can_be_root() -> bool:
    if os.geteuid() == 0:
        return True
    sudo = shutil.which("sudo")
    return bool(sudo) and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0


@dataclass
class Docker:
    argv: list[str]  # the CLI, with sudo in front where the daemon needs it
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True):
        out = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.returncode}\n{out.stderr}")
        return out


@pytest.fixture(scope="module")
def docker() -> Docker:
    found = docker_cli()
    if found is None:
        if not can_be_root():
            pytest.skip("no Docker CLI that builds with BuildKit, and no root to install one")
        pytest.fail("no Docker CLI that builds with BuildKit: ./.ci/docker-up installs docker.io")
    cli, env = found
    for argv in ([cli], ["sudo", "-n", cli]):
        if subprocess.run([*argv, "info"], env=env, capture_output=True).returncode == 0:
            break
    else:
        if not can_be_root():
            pytest.skip("no Docker daemon answers, and without root none can be started")
        pytest.fail("no Docker daemon answers: ./.ci/docker-up starts one (`make test` runs it)")
    d = Docker(argv, env)
    if d("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} missing: ./.ci/docker-up makes it")
    return d


def torch_index(settings: dict[tuple[str, str], str]) -> str:
    """The CPU wheel index of the README, when this machine reaches it; else the index pip
    uses here (whose local wheels, if any, the pip configuration brings)."""
    with contextlib.suppress(OSError):
        socket.getaddrinfo("download.pytorch.org", 443)
        return TORCH_CPU_INDEX
    return settings.get(("global", "index-url"), "https://pypi.org/simple")


@pytest.fixture(scope="module")
def image(docker, tmp_path_factory):
    tag = f"shotstream-test:{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("build")
    settings = pip_settings()
    args = [
        "build",
        "--network",
        "host",
        "--progress",
        "plain",
        "-t",
        tag,
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg",
        "EXTRAS=",
        "--build-arg",
        f"TORCH_INDEX_URL={torch_index(settings)}",
    ]
    ca = ca_bundle(settings)
    if ca is not None:
        args += ["--secret", f"id=ca,src={ca}"]
    log = tmp / "build.log"
    try:
        with LocalFiles() as files:
            conf = build_pip_conf(settings, files)
            if conf:
                (tmp / "pip.conf").write_text(conf)
                args += ["--secret", f"id=pip,src={tmp / 'pip.conf'}"]
            t0 = time.monotonic()
            out = docker(*args, str(REPO), timeout=1100, check=False)
            build_s = time.monotonic() - t0
        log.write_text(out.stdout + out.stderr)
        assert out.returncode == 0, f"docker build failed:\n{(out.stdout + out.stderr)[-6000:]}"
        size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
        print(json.dumps({"build_s": round(build_s, 1), "image_bytes": size}))
        yield tag
    finally:
        docker("image", "rm", "-f", tag, check=False)


class Container:
    """One `docker run -d` of the image, its port published on loopback; removed on exit."""

    def __init__(self, docker: Docker, image: str, *run_args: str, env: dict[str, str]):
        self.docker = docker
        flags = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.started = time.monotonic()
        self.id = docker("run", "-d", "-p", "127.0.0.1::8000", *flags, *run_args, image).stdout
        self.id = self.id.strip()
        port = docker("port", self.id, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.docker("rm", "-f", "-v", self.id, check=False)  # -v: its /weights volume

    def inspect(self, fmt: str) -> str:
        return self.docker("inspect", "-f", fmt, self.id).stdout.strip()

    def logs(self) -> str:
        out = self.docker("logs", self.id)
        return out.stdout + out.stderr

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_for(self, path: str, timeout: float = 180) -> float:
        """Seconds from `docker run` until `path` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + path, timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            assert self.inspect("{{.State.Running}}") == "true", self.logs()
            time.sleep(0.1)
        raise AssertionError(f"{path} not 200 in {timeout} s:\n{self.logs()[-4000:]}")

    def create(self) -> dict:
        r = httpx.post(self.base + "/v1/sessions", json={"prompt": PROMPT, "seed": 1}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()


def test_cpu_image_serves_a_stream_as_a_non_root_pid_1(docker, image, tmp_path):
    # the image's own HEALTHCHECK command, checked every second instead of every 30
    with Container(docker, image, "--health-interval", "1s", env=CPU_ENV) as c:
        healthy_s = c.wait_for("/healthz")
        ready_s = c.wait_for("/readyz")
        deadline = time.monotonic() + 30
        while c.inspect("{{.State.Health.Status}}") != "healthy":
            assert time.monotonic() < deadline, c.inspect("{{json .State.Health}}")
            time.sleep(0.2)
        check_s = time.monotonic() - c.started
        print(
            json.dumps(
                {
                    "healthz_s": round(healthy_s, 1),
                    "readyz_s": round(ready_s, 1),
                    "docker_healthy_s": round(check_s, 1),
                }
            )
        )

        # the server itself is PID 1 (signals reach it), as uid/gid 10001
        status = docker("exec", c.id, "cat", "/proc/1/status").stdout
        uids = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:"))
        gids = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Gid:"))
        assert set(uids) == {"10001"} and set(gids) == {"10001"}, status
        cmdline = docker("exec", c.id, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert cmdline[1:3] == ["/opt/venv/bin/shotstream", "serve"], cmdline
        # the build's secrets and package lists stayed out of the image
        find = "find /var/lib/apt/lists /run/secrets -mindepth 1 2>/dev/null; true"
        left = docker("exec", c.id, "sh", "-c", find)
        assert left.stdout.split() == [], left.stdout
        history = docker("history", "--no-trunc", image).stdout
        assert "BEGIN CERTIFICATE" not in history

        d = c.create()

        async def watch():
            async with StreamClient(d["stream_url"], d["token"]) as s:
                await s.chunks(3)
                return s.stream

        stream = asyncio.run(watch())
        video = tmp_path / "stream.mp4"
        video.write_bytes(stream.video())
        frames = ffprobe_frames(video)
        assert len(frames) == sum(ch.message["frames"] for ch in stream.chunks)
        assert frames[0]["key_frame"] == 1


def test_docker_stop_drains_a_stream_and_exits_0(docker, image):
    """A plain `docker stop` (10 s, then SIGKILL) during a stream: the viewer gets `ended`
    (reason `draining`) and the server exits 0; a session nobody connected to ends at once
    instead of holding the drain."""
    with Container(docker, image, env=CPU_ENV) as c:
        c.wait_for("/readyz")
        idle = c.create()  # never connected
        d = c.create()

        async def stop_during_stream():
            async with StreamClient(d["stream_url"], d["token"]) as s:
                await s.chunks(1)
                t0 = time.monotonic()
                stop = asyncio.create_task(asyncio.to_thread(docker, "stop", c.id, timeout=60))
                stream = await s.closed(timeout=DOCKER_STOP_TIMEOUT_S + 5)
                await stop
                return stream, time.monotonic() - t0

        stream, stop_s = asyncio.run(stop_during_stream())
        print(json.dumps({"docker_stop_s": round(stop_s, 1)}))
        assert stream.of("ended") == [{"type": "ended", "reason": "draining"}], stream.messages[-3:]
        assert c.inspect("{{.State.ExitCode}}") == "0", c.logs()[-4000:]
        assert c.inspect("{{.State.OOMKilled}}") == "false"

        events = c.events()
        ended = {e["session_id"]: e for e in events if e.get("event") == "session ended"}
        assert ended[idle["session_id"]]["reason"] == "draining"
        assert ended[d["session_id"]]["reason"] == "draining"
        (drain,) = [e for e in events if e.get("event") == "draining"]
        assert drain["grace_s"] == 5  # the image's SHOTSTREAM_DRAIN_GRACE_S
        # the idle session ended when the drain began, the stream only after the grace
        held = seconds(ended[d["session_id"]]["ts"]) - seconds(ended[idle["session_id"]]["ts"])
        assert held >= drain["grace_s"] - 1, (ended, drain)
        assert any(e.get("event") == "stopped" for e in events)


def seconds(ts: str) -> float:
    """A log line's `ts` (2026-11-25T11:28:35.721Z) in seconds since the epoch."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
