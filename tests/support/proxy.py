"""The shipped nginx config (docker/nginx/shotstream.conf.template) run on loopback, for
tests: Debian's nginx, a DNS server playing Kubernetes' (or compose's) name service, and
replicas on 127.0.0.x addresses that share one port, as pods share a container port.

The template is rendered the way the official nginx image renders it (envsubst of the
variables that are set), so the file under test is the file that ships.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

from tests.support.server import REPO, ServerProcess, free_port

TEMPLATE = REPO / "docker" / "nginx" / "shotstream.conf.template"
DOMAIN = "replicas.test"  # stands in for <headless service>.<namespace>.svc.cluster.local
POOL = "pool." + DOMAIN  # stands in for the Service of ready pods


def render(template: str, env: dict[str, str]) -> str:
    """envsubst restricted to `env`, as the nginx image's 20-envsubst-on-templates.sh does:
    `${NAME}` of a set variable is replaced, everything else (nginx's `$vars`) is kept."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m[1], m[0]), template)


class Names(BaseResolver):
    """A records from a table the test can change: name -> addresses."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            addrs = list(self.table.get(name, []))
        if not addrs:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for addr in addrs:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(addr), ttl=1))
        return reply


@contextlib.contextmanager
def dns(names: Names) -> Iterator[int]:
    """A UDP DNS server on 127.0.0.1 answering from `names`; yields its port."""
    port = free_port()
    server = DNSServer(names, address="127.0.0.1", port=port, logger=_Quiet())
    server.start_thread()
    try:
        yield port
    finally:
        server.stop()


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None


class Replica(ServerProcess):
    """A `shotstream serve` process on its own loopback address, as a pod on its own IP."""

    def __init__(self, tmp: Path, host: str, port: int, replica_id: str, **settings):
        super().__init__(tmp, host=host, port=port, replica_id=replica_id, **settings)
        self.host, self.port, self.id = host, port, replica_id
        self.base = f"http://{host}:{port}"


class Nginx:
    """Debian's nginx serving the rendered template; its JSON access log is kept."""

    def __init__(self, tmp: Path, dns_port: int, backend_port: int):
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise FileNotFoundError("nginx not found: run ./.ci/system-deps (Debian `nginx`)")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = tmp / "nginx"
        self.dir.mkdir()
        env = {
            "NGINX_LOCAL_RESOLVERS": f"127.0.0.1:{dns_port}",
            "SHOTSTREAM_PROXY_LISTEN": f"127.0.0.1:{self.port}",
            "SHOTSTREAM_REPLICA_DOMAIN": "." + DOMAIN,
            "SHOTSTREAM_POOL": POOL,
            "SHOTSTREAM_BACKEND_PORT": str(backend_port),
        }
        conf = render(TEMPLATE.read_text(), env)
        assert "${" not in conf, "a template variable the test does not set"
        (self.dir / "shotstream.conf").write_text(conf)
        # The image's nginx.conf, reduced: our file is included in `http`, as conf.d is.
        d = self.dir
        (d / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/shotstream.conf;
}}
""")
        self.access_log = d / "access.log"
        self._out = open(self.access_log, "w")  # noqa: SIM115 (closed in stop)
        # -e: nginx >= 1.19.5 otherwise opens the default error log (not ours) first
        self.proc = subprocess.Popen(
            [binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_up(self, timeout: float = 30.0) -> Nginx:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{self.errors()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/proxy/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"nginx not up in {timeout}s:\n{self.errors()}")

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def requests(self) -> list[dict]:
        """The access log: one dict per request (`upstream_addr`, `upstream_status`, ...)."""
        self._out.flush()
        out = []
        for line in self.access_log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
