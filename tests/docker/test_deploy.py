"""The deployment files, checked as far as a host without a Docker engine allows: Prometheus
config and alert rules (promtool, with rule unit tests), the compose files (`docker-compose
config`), the Dockerfile (hadolint and its structure), the Grafana provisioning and the
dashboard JSON. That the dashboard's queries name exported metrics and run on Prometheus is
tested against a real scrape in tests/server/test_metrics.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.support.server import REPO

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent  # hadolint and docker-compose come with the dev extra

# What a stop costs after the drain's grace: up to 2.5 s for the `ended` messages to reach
# the streams (AppState.drain), then uvicorn's shutdown and the engine's stop, well under a
# second once the streams have closed (a real `docker stop` mid-stream: tests/docker/
# test_image.py). A stream that does not answer the close can hold uvicorn's shutdown for
# its timeout_graceful_shutdown more (stalled_s).
SHUTDOWN_S = 3.0


def stalled_s() -> float:
    """uvicorn's timeout_graceful_shutdown, as server/serve.py sets it."""
    found = re.search(r"timeout_graceful_shutdown=([\d.]+)", (REPO / "server/serve.py").read_text())
    assert found, "server/serve.py sets no timeout_graceful_shutdown=N: what bounds the shutdown?"
    return float(found[1])


DOCKER_STOP_S = 10  # `docker stop`'s and `docker run`'s default stop timeout


def seconds(duration: str | int | float) -> float:
    """A compose duration (`30s`, `1m30s`) or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([\d.]+)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} not found: `make venv` (dev extra) or ./.ci/system-deps installs it")
    return path


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# -- Prometheus -------------------------------------------------------------------------------
def test_promtool_check_config():
    out = run(tool("promtool"), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout  # alerts.yml is loaded, not just present


def test_promtool_check_rules():
    out = run(tool("promtool"), "check", "rules", str(DOCKER / "prometheus" / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_for_the_replica_in_trouble_only():
    # alerts.test.yml: deadline misses, TTFF p95, capacity refusals, engine failure, down
    out = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=DOCKER / "prometheus")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (DOCKER / "prometheus" / "alerts.test.yml").read_text())
    )
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]
    assert {r["alert"] for g in rules for r in g["rules"]} == tested  # every alert is tested


def test_prometheus_scrapes_the_compose_service():
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    targets = [
        t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert targets == ["shotstream:8000"] and "shotstream" in compose["services"]


# -- compose ----------------------------------------------------------------------------------
def compose_config(*files: str) -> dict:
    args = [tool("docker-compose")]
    for f in files:
        args += ["-f", str(DOCKER / f)]
    out = run(*args, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_gpu_stack():
    cfg = compose_config("compose.yaml")
    assert set(cfg["services"]) == {"shotstream", "prometheus", "grafana"}
    srv = cfg["services"]["shotstream"]
    (device,) = srv["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert srv["environment"]["SHOTSTREAM_PRESET"] == "wan2.1-1.3b"
    assert srv["environment"]["SHOTSTREAM_WEIGHTS"] == "/weights"
    assert any(v["target"] == "/weights" for v in srv["volumes"])
    assert Path(srv["build"]["context"]) == REPO and srv["build"]["dockerfile"] == "Dockerfile"
    mounts = {v["target"]: Path(v["source"]) for v in cfg["services"]["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == DOCKER / "grafana" / "dashboards"
    prom = {v["target"]: Path(v["source"]) for v in cfg["services"]["prometheus"]["volumes"]}
    assert prom["/etc/prometheus"] == DOCKER / "prometheus"


def test_compose_cpu_variant_runs_demo_without_a_gpu():
    cfg = compose_config("compose.yaml", "compose.cpu.yaml")
    srv = cfg["services"]["shotstream"]
    assert "deploy" not in srv or not srv["deploy"].get("resources")
    assert srv["environment"]["SHOTSTREAM_PRESET"] == "demo"
    assert srv["environment"]["SHOTSTREAM_WEIGHTS"] == ""  # empty means none: random weights
    assert srv["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


@pytest.mark.parametrize(
    "files",
    [
        ["compose.yaml"],
        ["compose.yaml", "compose.cpu.yaml"],
        ["compose.yaml", "compose.scale.yaml"],
        ["compose.yaml", "compose.scale.yaml", "compose.scale.cpu.yaml"],
    ],
    ids=["gpu", "cpu", "scale", "scale-cpu"],
)
def test_compose_stop_grace_period_covers_the_drain(files):
    """docker compose stop waits stop_grace_period, then kills: a replica's drain and its
    shutdown, a stalled stream included, must end before that."""
    services = compose_config(*files)["services"]
    replicas = {n: s for n, s in services.items() if n.startswith("shotstream")}
    assert replicas
    for name, srv in replicas.items():
        drain = float(srv["environment"]["SHOTSTREAM_DRAIN_GRACE_S"])
        stop = seconds(srv.get("stop_grace_period", DOCKER_STOP_S))
        assert stop >= drain + SHUTDOWN_S + stalled_s(), (name, stop, drain)


def test_empty_weights_setting_means_random_weights(monkeypatch):
    from server.settings import Settings

    monkeypatch.setenv("SHOTSTREAM_WEIGHTS", "")
    monkeypatch.setenv("SHOTSTREAM_API_KEY", "")
    s = Settings()
    assert s.weights is None and s.api_key is None


# -- Dockerfile -------------------------------------------------------------------------------
def test_hadolint():
    out = run(tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    out: list[list[str]] = []
    for ln in lines:
        if ln.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(ln)
    return out


def test_dockerfile_final_stage():
    *_, final = stages()
    assert len(stages()) == 2
    text = "\n".join(final)
    user = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD .*/healthz", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert 'VOLUME ["/weights"]' in text
    assert "SHOTSTREAM_WEIGHTS=/weights" in text and "SHOTSTREAM_HOST=0.0.0.0" in text
    assert re.search(r'^CMD \["shotstream", "serve"\]$', text, re.M)
    # no build toolchain or pip caches in the image that runs
    for word in ("gcc", "g++", "build-essential", "python3-dev", "python3-venv", "pip install"):
        assert word not in text, word
    assert "COPY --from=builder /opt/venv /opt/venv" in text


def test_dockerfile_builder_installs_cuda_torch_and_the_gpu_extra():
    builder, final = stages()
    text = "\n".join(builder)
    assert "FROM ${BASE_IMAGE} AS builder" in text and final[0] == "FROM ${BASE_IMAGE}"
    head = (REPO / "Dockerfile").read_text().split("FROM", 1)[0]
    assert re.search(r"ARG BASE_IMAGE=nvidia/cuda:[\d.]+-(runtime|base)-ubuntu", head)
    (pin,) = re.findall(r"torch==([\d.]+)", text)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert pin in torch.specifier  # the image's torch is one the project accepts
    assert "ARG EXTRAS=gpu" in text and "${EXTRAS:+[$EXTRAS]}" in text


def test_dockerfile_needs_no_frontend_from_a_registry():
    """A `# syntax=` line makes BuildKit pull a Dockerfile frontend image before anything
    else, which fails on an air-gapped builder; the builder's own frontend is enough."""
    first = (REPO / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), first


def test_pip_steps_take_the_ca_and_pip_config_as_secrets_only():
    """The optional CA bundle and pip.conf are BuildKit secrets mounted by the pip steps of
    the builder: never copied, never in an ARG or ENV, never in the final stage."""
    builder, final = stages()
    pip_steps = [ln for ln in builder if ln.startswith("RUN") and "pip install" in ln]
    assert len(pip_steps) >= 2
    for step in pip_steps:
        assert "--mount=type=secret,id=ca" in step and "--mount=type=secret,id=pip" in step
        assert "PIP_CERT=/run/secrets/ca" in step and "PIP_CONFIG_FILE=/run/secrets/pip" in step
    others = [ln for ln in builder + final if ln not in pip_steps]
    assert not [ln for ln in others if "secret" in ln or "PIP_CERT" in ln], others


def test_both_stages_leave_no_apt_lists_or_archives():
    for stage in stages():
        for step in (ln for ln in stage if "apt-get install" in ln):
            assert "apt-get clean" in step and "rm -rf /var/lib/apt/lists/*" in step, step


def test_the_image_drain_fits_a_plain_docker_stop():
    """`docker stop` (and `docker run` without --stop-timeout) kill after 10 s: the image's
    drain grace and the shutdown after it end before that. A stalled stream's extra
    stalled_s() does not fit; a longer --stop-timeout with a larger grace is in docker/README."""
    *_, final = stages()
    env = dict(
        re.findall(
            r"(SHOTSTREAM_\w+)=(\S*)", "\n".join(ln for ln in final if ln.startswith("ENV "))
        )
    )
    assert float(env["SHOTSTREAM_DRAIN_GRACE_S"]) + SHUTDOWN_S <= DOCKER_STOP_S


def test_dockerignore_lets_in_every_package():
    rules = (REPO / ".dockerignore").read_text().split()
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in include["packages"]["find"]["include"]:
        top = pattern.rstrip("*").rstrip(".")
        assert f"!{top}/" in rules, f"{top} is a package but the image's build context lacks it"


def test_dockerignore_keeps_weights_and_venv_out():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"  # everything out, then an allow-list
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed >= {
        "pyproject.toml",
        "model",
        "cache",
        "server",
        "clients",
        "docker/entrypoint.sh",
    }
    assert not allowed & {".venv", "weights", "tests", "artifacts"}


def test_entrypoint_downloads_only_when_asked(tmp_path):
    """The entrypoint with a fake `shotstream` on PATH: it downloads only with
    SHOTSTREAM_DOWNLOAD=1, then execs the command."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "shotstream").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    (fake / "shotstream").chmod(0o755)
    entry = str(DOCKER / "entrypoint.sh")
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SHOTSTREAM_WEIGHTS": "/w", "SHOTSTREAM_PRESET": "p"}
    out = subprocess.run([entry, "shotstream", "serve"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["serve"]
    env["SHOTSTREAM_DOWNLOAD"] = "1"
    out = subprocess.run([entry, "shotstream", "serve"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "calls").read_text().splitlines()[1:] == [
        "download --dir /w --preset p",
        "serve",
    ]


# -- Grafana ----------------------------------------------------------------------------------
def test_dashboard_json_is_generated_from_its_script():
    out = run(sys.executable, str(DOCKER / "grafana" / "dashboard.py"), "--check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_uses_the_provisioned_datasource():
    ds = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "shotstream.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == source["uid"] for t in p["targets"])
        assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]
    prov = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "shotstream.yaml").read_text()
    )
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_panels_do_not_overlap():
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "shotstream.json").read_text())
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, p["title"]
        cells |= mine
