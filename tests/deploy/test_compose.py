"""The docker compose quickstart (deploy/compose/, issue 17), checked without a Docker
engine: the file validates against the Compose Specification's JSON schema (vendored in
tests/deploy/schemas/; `docker compose config` too where the CLI exists), every mounted
file exists, the services agree with each other and with Dovecote's settings, Prometheus'
config passes `promtool check config`, and nginx's passes `nginx -t`."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
TOOLS_PYTHON = ROOT / ".venv-tools" / "bin" / "python"
NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
)

_VALIDATE = """
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
doc = json.load(sys.stdin)
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: e.path)
print(json.dumps([f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]))
"""


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def schema_errors(doc: dict[str, Any]) -> list[str]:
    assert TOOLS_PYTHON.exists(), "run `make deploy-tools` (creates .venv-tools)"
    done = subprocess.run(
        [str(TOOLS_PYTHON), "-c", _VALIDATE, str(SCHEMA)],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        check=True,
    )
    errors: list[str] = json.loads(done.stdout)
    return errors


def test_compose_file_matches_the_compose_spec() -> None:
    assert schema_errors(compose()) == []


def test_schema_validation_catches_mistakes() -> None:
    doc = compose()
    doc["services"]["dovecote"]["enviroment"] = {"X": "1"}  # misspelt key
    doc["services"]["nginx"]["ports"] = "8080:8080"  # a string, not a list
    errors = schema_errors(doc)
    assert any("enviroment" in e for e in errors), errors
    assert any(e.startswith("services/nginx/ports") for e in errors), errors


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="no `docker compose` CLI on this machine")
def test_docker_compose_config() -> None:
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_mounted_file_and_the_build_context_exist() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
    context = COMPOSE_DIR / services["dovecote"]["build"]["context"]
    assert (context / "Dockerfile").exists()
    # The shipped dashboard and rules, not copies.
    mounts = [v for s in services.values() for v in s.get("volumes", [])]
    assert "../grafana/dovecote.json:/var/lib/grafana/dashboards/dovecote.json:ro" in mounts
    assert any(v.startswith("../prometheus/dovecote-rules.yml:") for v in mounts)


def test_services_agree_with_each_other_and_with_dovecote() -> None:
    from dovecote.ops.settings import Settings

    doc = compose()
    services = doc["services"]
    env = {k: str(v) for k, v in services["dovecote"]["environment"].items()}
    assert env["DOVECOTE_PUBLIC_URL"] == "${PUBLIC_URL:-http://localhost:8080}"
    # The image's own settings (Dockerfile ENV) plus the compose ones must be a valid,
    # startable configuration: a public URL, a PostgreSQL store on the postgres service.
    env["DOVECOTE_PUBLIC_URL"] = "http://localhost:8080"
    # Any: pydantic validates the strings, as it does the environment's.
    fields: dict[str, Any] = {k.removeprefix("DOVECOTE_").lower(): v for k, v in env.items()}
    settings = Settings(host="0.0.0.0", **fields)
    assert not settings.advertises_unspecified_address
    assert settings.store_url.startswith("postgresql://")
    pg = services["postgres"]["environment"]
    assert settings.store_url == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert services["dovecote"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # nginx is the only way in, and its address is the only trusted proxy.
    assert "ports" not in services["dovecote"]
    assert services["nginx"]["ports"] == ["8080:8080"]
    nginx_ip = ipaddress.ip_address(services["nginx"]["networks"]["frontend"]["ipv4_address"])
    trusted = [ipaddress.ip_network(n) for n in settings.trusted_proxies]
    assert any(nginx_ip in net for net in trusted)
    subnet = ipaddress.ip_network(doc["networks"]["frontend"]["ipam"]["config"][0]["subnet"])
    assert nginx_ip in subnet
    conf = (COMPOSE_DIR / "nginx" / "dovecote.conf").read_text()
    assert f"server dovecote:{settings.port} " in conf
    assert "listen 8080;" in conf
    assert f"client_max_body_size {settings.max_body_bytes // (1024 * 1024)}m;" in conf
    # The probe goes through nginx and the public URL; Prometheus scrapes it and Dovecote.
    probe = services["probe"]
    assert probe["network_mode"] == "service:nginx"
    assert probe["command"][:3] == ["dovecote", "probe", "http://localhost:8080"]
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in prom["scrape_configs"]}
    assert targets["dovecote"] == [f"dovecote:{settings.port}"]
    metrics_port = probe["command"][probe["command"].index("--metrics-port") + 1]
    assert targets["dovecote-probe"] == [f"nginx:{metrics_port}"]
    provider = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "dovecote.yaml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "run `make deploy-tools` (installs promtool)"
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    # The rules file sits where the compose file mounts it: point at the repository's copy.
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "dovecote-rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(NGINX is None, reason="nginx not installed")
def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    assert NGINX is not None
    # `dovecote` only resolves inside the compose network.
    conf = (COMPOSE_DIR / "nginx" / "dovecote.conf").read_text()
    (tmp_path / "default.conf").write_text(conf.replace("server dovecote:", "server 127.0.0.1:"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\n"
        "events {}\nhttp {\n"
        f"  client_body_temp_path {tmp_path}/cb; proxy_temp_path {tmp_path}/px;\n"
        f"  access_log off;\n  include {tmp_path}/default.conf;\n}}\n"
    )
    done = subprocess.run(
        [
            NGINX,
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "logs" / "error.log"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
