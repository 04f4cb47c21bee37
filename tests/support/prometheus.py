"""A real Prometheus (Debian package `prometheus`) scraping a test server, for tests and
bench/dashboard_snapshot.py: the dashboard's and alert rules' PromQL run on real scrapes."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from tests.support.server import REPO, free_port

ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"


@contextlib.contextmanager
def prometheus(tmp: Path, target: str, interval: str = "1s") -> Iterator[str]:
    """Prometheus scraping `target` every `interval` with docker/'s alert rules; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus not found: run ./.ci/system-deps (Debian `prometheus`)")
    port = free_port()
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "shotstream", "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + (tmp / "prometheus.log").read_text())
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready in 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def wait_scraped_after(base: str, when: float, timeout: float = 30.0) -> None:
    """Wait until every target was scraped (successfully) after the wall time `when`."""
    deadline = time.monotonic() + timeout
    while True:
        targets = httpx.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        if targets and all(t["health"] == "up" and _ts(t["lastScrape"]) > when for t in targets):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"prometheus did not scrape after {when}: {targets}")
        time.sleep(0.2)


def _ts(rfc3339: str) -> float:
    # Prometheus writes nanoseconds; Python 3.10's fromisoformat takes at most microseconds
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00").timestamp()
