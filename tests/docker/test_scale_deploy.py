"""The scale-out deployment files: Kubernetes manifests (docker/k8s) against the Kubernetes
API's OpenAPI schemas (kubernetes-validate, strict), and for how they fit together (drain
timing, probes, Services, the proxy's config); the nginx template accepted by `nginx -t` as
compose and Kubernetes render it; the compose scale-out files (`docker-compose config`).
The proxy's behaviour itself is tested on loopback in tests/scale.

The PodMonitor is a Prometheus Operator CRD whose schema is not available here: it is
checked for what it selects, not against a schema."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.docker.test_deploy import DOCKER, SHUTDOWN_S, compose_config, run, stalled_s, tool
from tests.support.proxy import TEMPLATE, render
from tests.support.server import free_port

K8S = DOCKER / "k8s"
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # oldest supported, newest
CRD_GROUPS = {"monitoring.coreos.com"}  # Prometheus Operator: no schema here
TEMPLATE_VARS = set(re.findall(r"\$\{([A-Z_]+)\}", TEMPLATE.read_text()))
REPLICA = {"app.kubernetes.io/name": "shotstream", "app.kubernetes.io/component": "replica"}


def manifests() -> list[dict]:
    files = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [d for f in files for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def one(kind: str, name: str) -> dict:
    (doc,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def env_of(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- schemas ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_the_kubernetes_schemas(version):
    checked = []
    for doc in manifests():
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
        checked.append(doc["kind"])
    assert sorted(set(checked)) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "StatefulSet",
    ]


def test_the_schema_check_catches_mistakes():
    sts = one("StatefulSet", "shotstream")
    bad = copy.deepcopy(sts)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(sts)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "prometheus-adapter.values.yaml",  # Helm values, not a manifest
    }
    assert listed == on_disk


# -- how the pieces fit -------------------------------------------------------------------------
def test_replicas_are_gpu_pods_with_probes_and_a_drain_that_fits_the_grace_period():
    from server.settings import Settings

    sts = one("StatefulSet", "shotstream")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert sts["spec"]["template"]["metadata"]["labels"] == REPLICA
    assert sts["spec"]["selector"]["matchLabels"] == REPLICA
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(c)
    assert env["SHOTSTREAM_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["SHOTSTREAM_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(env["SHOTSTREAM_PORT"])
    # preStop, then SIGTERM: the pod's drain grace, then the shutdown (a stalled stream's
    # included) end before the kubelet kills the container
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    drain = float(env["SHOTSTREAM_DRAIN_GRACE_S"])
    need = int(pre[1]) + drain + SHUTDOWN_S + stalled_s()
    assert pod["terminationGracePeriodSeconds"] >= need
    # pods are named <statefulset>-N: valid replica ids
    Settings(replica_id=f"{sts['metadata']['name']}-12")


@pytest.mark.parametrize("bad", ["a.b", "Shotstream-0", "-x", "x-", "", "a" * 64, "a/b"])
def test_replica_ids_are_dns_labels(bad):
    """The proxy reads the replica id up to the first dot of a session id and resolves it as
    a host name: anything else is refused at start."""
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError):
        Settings(replica_id=bad)


def test_services_give_each_replica_a_name_and_the_pool_only_ready_pods():
    sts = one("StatefulSet", "shotstream")
    headless = one("Service", sts["spec"]["serviceName"])
    pool = one("Service", "shotstream-pool")
    for svc in (headless, pool):
        assert svc["spec"]["clusterIP"] == "None"  # names resolve to pod addresses
        assert svc["spec"]["selector"] == REPLICA
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert headless["spec"]["publishNotReadyAddresses"] is True  # a draining pod stays reachable
    assert not pool["spec"].get("publishNotReadyAddresses")  # new sessions: ready pods only
    pdb = one("PodDisruptionBudget", "shotstream")
    assert pdb["spec"]["selector"]["matchLabels"] == REPLICA and pdb["spec"]["maxUnavailable"] == 1


def test_proxy_runs_the_shipped_template_pointed_at_the_services():
    cm = one("ConfigMap", "shotstream-proxy")
    assert cm["data"]["default.conf.template"] == TEMPLATE.read_text()  # the same file
    dep = one("Deployment", "shotstream-proxy")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (vol,) = [v for v in pod["volumes"] if v["name"] == "templates"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["templates"] == "/etc/nginx/templates"  # the image renders it to conf.d
    env = env_of(c)
    assert TEMPLATE_VARS - {"NGINX_LOCAL_RESOLVERS"} <= set(env)
    assert env["NGINX_ENTRYPOINT_LOCAL_RESOLVERS"] == "1"  # fills NGINX_LOCAL_RESOLVERS
    sts = one("StatefulSet", "shotstream")
    ns = "$(POD_NAMESPACE)"
    assert (
        env["SHOTSTREAM_REPLICA_DOMAIN"] == f".{sts['spec']['serviceName']}.{ns}.svc.cluster.local"
    )
    assert env["SHOTSTREAM_POOL"] == f"shotstream-pool.{ns}.svc.cluster.local"
    assert (
        env["SHOTSTREAM_BACKEND_PORT"]
        == env_of(sts["spec"]["template"]["spec"]["containers"][0])["SHOTSTREAM_PORT"]
    )
    listen = int(env["SHOTSTREAM_PROXY_LISTEN"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == listen
    svc = one("Service", "shotstream-proxy")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # the replicas' NetworkPolicy lets the proxy in
    netpol = one("NetworkPolicy", "shotstream")
    allowed = [
        f["podSelector"]["matchLabels"] for r in netpol["spec"]["ingress"] for f in r["from"]
    ]
    assert dep["spec"]["template"]["metadata"]["labels"] in allowed


def test_pod_monitor_scrapes_the_replicas_by_pod_name():
    pm = one("PodMonitor", "shotstream")  # CRD: structure only, see the module docstring
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == REPLICA
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in ep[
        "relabelings"
    ]


def test_autoscaler_metric_comes_from_the_free_slots_gauges(tmp_path):
    """The HPA's metric is the adapter rule's; its PromQL is valid and names gauges the
    server exports."""
    hpa = one("HorizontalPodAutoscaler", "shotstream")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "shotstream",
    }
    (metric,) = hpa["spec"]["metrics"]
    values = yaml.safe_load((K8S / "prometheus-adapter.values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    query = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "namespace, pod")
        .replace("<<.LabelMatchers>>", 'namespace="shotstream",pod=~"shotstream-0|shotstream-1"')
    )
    rules = {
        "groups": [
            {"name": "adapter", "rules": [{"record": "shotstream:slot_utilization", "expr": query}]}
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    out = run(tool("promtool"), "check", "rules", str(tmp_path / "rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    used = set(re.findall(r"shotstream_[a-z_]+", query + rule["seriesQuery"]))
    assert used == {"shotstream_free_slots", "shotstream_capacity_sessions"}
    assert used <= exported_gauges()


def exported_gauges() -> set[str]:
    """The gauges an engine exports (a stand-in runner; no model needed)."""
    from tests.support.engine import engine_metrics

    runner = SimpleNamespace(
        pool=SimpleNamespace(breakdown=lambda: {"kv": 0}, bytes_in_use=0),
        memory_stats=lambda: {},
        bytes_per_session=lambda: 1,
        free_device_bytes=lambda: 8,
    )
    metrics = engine_metrics(runner)
    return {f.name for f in text_string_to_metric_families(metrics.render().decode())}


# -- nginx -t, as compose and Kubernetes render the template ---------------------------------------
def nginx_test(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    conf = render(TEMPLATE.read_text(), env)
    assert "${" not in conf
    (tmp / "shotstream.conf").write_text(conf)
    (tmp / "nginx.conf").write_text(
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n client_body_temp_path {tmp}/body;\n proxy_temp_path {tmp}/proxy;\n"
        f" include {tmp}/shotstream.conf;\n}}\n"
    )
    return run(
        tool("nginx"),
        "-t",
        "-p",
        str(tmp),
        "-c",
        str(tmp / "nginx.conf"),
        "-e",
        str(tmp / "error.log"),
    )


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_nginx_accepts_the_rendered_template(tmp_path, where):
    if where == "compose":
        env = dict(
            compose_config("compose.yaml", "compose.scale.yaml")["services"]["proxy"]["environment"]
        )
        env["NGINX_LOCAL_RESOLVERS"] = (
            "127.0.0.11"  # Docker's DNS, from the container's resolv.conf
        )
    else:
        (c,) = one("Deployment", "shotstream-proxy")["spec"]["template"]["spec"]["containers"]
        env = {
            k: v.replace("$(POD_NAMESPACE)", "shotstream")
            for k, v in env_of(c).items()
            if isinstance(v, str)
        }
        env["NGINX_LOCAL_RESOLVERS"] = "10.96.0.10"  # a cluster DNS Service address
    env["SHOTSTREAM_PROXY_LISTEN"] = f"127.0.0.1:{free_port()}"  # not the image's port 8000
    assert set(env) >= TEMPLATE_VARS
    out = nginx_test(tmp_path, env)
    assert out.returncode == 0 and "test is successful" in out.stderr, out.stderr


def test_nginx_refuses_a_broken_render(tmp_path):
    out = nginx_test(tmp_path, {v: "" for v in TEMPLATE_VARS})  # no listen, no resolver
    assert out.returncode != 0


# -- compose ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_compose_scale_runs_replicas_behind_the_proxy(cpu):
    files = ["compose.yaml", "compose.scale.yaml"] + (["compose.scale.cpu.yaml"] if cpu else [])
    cfg = compose_config(*files)
    services = cfg["services"]
    replicas = {n: s for n, s in services.items() if n.startswith("shotstream")}
    assert len(replicas) >= 2
    for name, srv in replicas.items():
        assert srv["environment"]["SHOTSTREAM_REPLICA_ID"] == name  # its DNS name
        assert "shotstream-pool" in srv["networks"]["default"]["aliases"]
        assert not srv.get("ports"), f"{name} is published: only the proxy should be"
        assert srv["environment"]["SHOTSTREAM_PRESET"] == ("demo" if cpu else "wan2.1-1.3b")
        assert bool(srv.get("deploy")) is not cpu
    if not cpu:  # one GPU each
        gpus = [s["deploy"]["resources"]["reservations"]["devices"] for s in replicas.values()]
        assert all(len(d) == 1 and d[0]["driver"] == "nvidia" for d in gpus)
        assert len({tuple(d[0]["device_ids"]) for d in gpus}) == len(gpus)
    assert len({s["volumes"][0]["source"] for s in replicas.values()}) == len(replicas)
    proxy = services["proxy"]
    assert [p["target"] for p in proxy["ports"]] == [
        int(proxy["environment"]["SHOTSTREAM_PROXY_LISTEN"])
    ]
    (mount,) = proxy["volumes"]
    assert Path(mount["source"]) == TEMPLATE
    assert mount["target"] == "/etc/nginx/templates/default.conf.template"
    assert TEMPLATE_VARS - {"NGINX_LOCAL_RESOLVERS"} <= set(proxy["environment"])
    assert proxy["environment"]["SHOTSTREAM_POOL"] == "shotstream-pool"
    # Prometheus scrapes every replica
    (flag,) = [a for a in services["prometheus"]["command"] if a.startswith("--config.file=")]
    prom = yaml.safe_load((DOCKER / "prometheus" / Path(flag.split("=", 1)[1]).name).read_text())
    targets = [
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert sorted(targets) == sorted(f"{n}:8000" for n in replicas)


def test_promtool_check_scale_config():
    out = run(
        tool("promtool"), "check", "config", str(DOCKER / "prometheus" / "prometheus.scale.yml")
    )
    assert out.returncode == 0, out.stdout + out.stderr
