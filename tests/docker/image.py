"""Building the root Dockerfile with what this machine's own pip uses: its CA bundle and its
pip configuration, handed to the build as BuildKit secrets (`ca`, `pip`). Local wheel folders
and `file://` indexes in that configuration are served over loopback HTTP for the build's
length (the build runs with `--network host`), so a machine whose torch wheel lies on disk
builds from it, and an ordinary one (no pip configuration) builds from the Dockerfile's
defaults."""

from __future__ import annotations

import ast
import contextlib
import functools
import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

# keys whose values are URLs or paths pip reads from; any other local path (cache-dir, log,
# cert) means nothing inside the build and is left out
URL_KEYS = {"index-url", "extra-index-url", "find-links", "constraint", "requirement"}
CERT_KEYS = {"cert", "client-cert"}


def pip_settings() -> dict[tuple[str, str], str]:
    """This machine's pip configuration (files and PIP_* variables; variables win), as
    {(section, key): value}."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    )
    files: dict[tuple[str, str], str] = {}
    env: dict[tuple[str, str], str] = {}
    for line in out.stdout.splitlines():
        name, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        value = ast.literal_eval(raw)
        if section == ":env:":
            env[("global", key)] = value
        else:
            files[(section, key)] = value
    return {**files, **env}


def ca_bundle(settings: dict[tuple[str, str], str]) -> Path | None:
    """The trust store pip uses here: its `cert`, else SSL_CERT_FILE, else the system one."""
    for candidate in (
        settings.get(("global", "cert")),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class LocalFiles:
    """A loopback HTTP server for the local folders and files a pip configuration names.
    A path is served at its own absolute path; only world-readable files under a named path
    or its parent folder (an index's `../../files/...` links) are served."""

    def __init__(self) -> None:
        self.roots: list[Path] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    def url(self, path: Path) -> str:
        path = path.resolve()
        self.roots.append(path.parent if path.parent != Path("/") else path)
        self.roots.append(path)
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{urllib.parse.quote(str(path))}" + (
            "/" if path.is_dir() else ""
        )

    def allowed(self, path: Path) -> bool:
        with contextlib.suppress(OSError):
            path = path.resolve()
            inside = any(path == r or r in path.parents for r in self.roots)
            return inside and bool(path.stat().st_mode & stat.S_IROTH)
        return False

    def __enter__(self) -> LocalFiles:
        files = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                local = Path(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
                return str(local) if files.allowed(local) else "/nonexistent"

            def log_message(self, *args) -> None:  # quiet
                pass

        handler = functools.partial(Handler, directory="/")
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


def local_path(token: str) -> Path | None:
    if token.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(token).path))
    if token.startswith("/"):
        return Path(token)
    return None


def build_pip_conf(settings: dict[tuple[str, str], str], files: LocalFiles) -> str:
    """A pip.conf for inside the build: local paths and file:// URLs become loopback URLs of
    `files`; certificates go as the `ca` secret instead; other local paths are left out."""
    sections: dict[str, list[str]] = {}
    for (section, key), value in sorted(settings.items()):
        if key in CERT_KEYS:
            continue
        tokens = value.split()
        if key in URL_KEYS:
            out = []
            for tok in tokens:
                path = local_path(tok)
                if path is None:
                    out.append(tok)
                elif path.exists():
                    out.append(files.url(path))
            if not out:
                continue
            value = " ".join(out)
        elif any(local_path(t) for t in tokens):
            continue
        sections.setdefault(section, []).append(f"{key} = {value}")
    return "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in sections.items()
    )


def docker_cli() -> tuple[str, dict[str, str]] | None:
    """A Docker CLI that builds with BuildKit, and the environment it needs: one with the
    buildx plugin, or an older one (Debian's 20.10) where DOCKER_BUILDKIT=1 turns it on.
    Docker 23 and later without buildx build with the legacy builder, which has no secrets."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    seen = set()
    for cli in (shutil.which("docker"), "/usr/bin/docker"):
        if not cli or cli in seen or not os.access(cli, os.X_OK):
            continue
        seen.add(cli)
        run = functools.partial(subprocess.run, capture_output=True, text=True, env=env)
        if run([cli, "buildx", "version"]).returncode == 0:
            return cli, env
        version = run([cli, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
        major = version.split(".")[0]
        if major.isdigit() and int(major) < 23:
            return cli, env
    return None
