"""Checks for the shipped SLO rules, their promtool unit tests and the Grafana dashboard.

promtool comes from Debian's `prometheus` package (`make deploy-tools`, which runs
scripts/install-promtool.sh). Without it these tests fail rather than skip: the rules are a
deliverable and must not silently go untested.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "dovecote-rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dovecote.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
APP_METRICS = ROOT / "src" / "dovecote" / "ops" / "metrics.py"
# `dovecote probe --every` exports its own dovecote_probe_* metrics.
PROBE_METRICS = ROOT / "src" / "dovecote" / "ops" / "probe.py"

PROMTOOL_TIMEOUT_S = 240

# Metrics the rules and the dashboard may use, by type (defined in src/dovecote/ops/metrics.py).
COUNTERS = {
    "dovecote_http_requests_total",
    "dovecote_didcomm_messages_total",
    "dovecote_messages_accepted_total",
    "dovecote_messages_delivered_total",
    "dovecote_messages_acknowledged_total",
    "dovecote_messages_expired_total",
    "dovecote_messages_dead_lettered_total",
    "dovecote_messages_duplicate_total",
    "dovecote_outbox_retries_total",
    "dovecote_websocket_disconnects_total",
    "dovecote_rooms_posts_total",
    "dovecote_rooms_fanout_deliveries_total",
}
GAUGES = {
    "dovecote_queue_depth",
    "dovecote_queue_oldest_age_seconds",
    "dovecote_outbox_size",
    "dovecote_outbox_lag_seconds",
    "dovecote_dlq_size",
    "dovecote_circuit_breaker_state",
    "dovecote_degradation_level",
    "dovecote_ready",
    "dovecote_backup_last_success_timestamp_seconds",
    "dovecote_cluster_instances",
    "dovecote_websocket_connections",
    "dovecote_rooms_subscriptions",
    "dovecote_probe_success",
    "dovecote_probe_last_success_timestamp_seconds",
}
HISTOGRAMS = {
    "dovecote_http_request_duration_seconds",
    "dovecote_message_push_latency_seconds",
    "dovecote_message_ack_latency_seconds",
    "dovecote_store_transaction_duration_seconds",
    "dovecote_store_group_commit_size",
    "dovecote_probe_duration_seconds",
}
# Series Prometheus itself provides.
PROMETHEUS_SERIES = {"up", "ALERTS"}

EXPORTED = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

# The dashboard must show each of these (a histogram counts through any of its series).
DASHBOARD_MUST_SHOW = COUNTERS | GAUGES | HISTOGRAMS

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Return the metric (series) names a PromQL expression selects.

    A small lexer, not a parser: drops strings, label matchers, ranges and grouping label
    lists, then keeps identifiers that are not keywords and not called like functions.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)", text):
        name = match.group(1)
        if name.lower() in PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):
            continue  # function or aggregation
        names.add(name)
    return names


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables so the expression is plain PromQL."""
    expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def label_values_selector(query: str) -> str:
    """`label_values(selector, label)` -> `selector`; other variable queries unchanged."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return match.group(1) if match else query


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    queries = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"variable {var['name']}", label_values_selector(query)))
    return queries


def require_promtool() -> str:
    """Path of promtool; a missing promtool fails the test (it must not be skipped)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH. Run `make deploy-tools` (it runs "
            "scripts/install-promtool.sh, which installs Debian's prometheus package)."
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`{' '.join(proc.args)}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def test_known_metrics_are_exported_by_the_app() -> None:
    """The names above must exist in the app, or rules and panels would show nothing."""
    exported: dict[str, set[str]] = {"Counter": set(), "Gauge": set(), "Histogram": set()}
    nodes = [
        n for path in (APP_METRICS, PROBE_METRICS) for n in ast.walk(ast.parse(path.read_text()))
    ]
    for node in nodes:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in exported
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            name = node.args[0].value
            if node.func.id == "Counter" and not name.endswith("_total"):
                name += "_total"  # prometheus_client exposes Counter "x" as x_total
            exported[node.func.id].add(name)
    assert COUNTERS - exported["Counter"] == set()
    assert GAUGES - exported["Gauge"] == set()
    assert HISTOGRAMS - exported["Histogram"] == set()


# ---------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert proc.returncode == 0, describe(proc)
    assert "SUCCESS" in proc.stdout + proc.stderr, describe(proc)


def test_rule_unit_test_files_exist() -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests/"


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_rule_unit_tests(test_file: Path) -> None:
    proc = run_promtool("test", "rules", str(test_file.relative_to(ROOT)))
    assert proc.returncode == 0, describe(proc)


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    tested = set()
    for test_file in RULE_TESTS:
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for alert_test in case.get("alert_rule_test", []):
                if alert_test.get("exp_alerts"):
                    tested.add(alert_test["alertname"])
    assert alerts - tested == set(), "alerts never shown firing in a promtool test"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool has no query linter, so wrap each query in a recording rule and check it."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries(dashboard))
    ]
    rule_file = tmp_path / "dashboard-queries.yml"
    # JSON is YAML, which promtool reads.
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", str(rule_file))
    assert proc.returncode == 0, describe(proc)


# ---------------------------------------------------------------- rules file


def test_alerts_have_severity_and_annotations() -> None:
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name} lacks {key}"
        assert annotations["runbook_url"] == f"docs/runbook.md#{name.lower()}", name


def markdown_anchors(text: str) -> set[str]:
    """GitHub-style anchors of the Markdown headings in text (outside code fences)."""
    anchors = set()
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(slug.replace(" ", "-"))
    return anchors


def test_runbook_urls_point_at_runbook_sections() -> None:
    anchors = markdown_anchors(RUNBOOK.read_text())
    for rule in load_rules():
        if "alert" in rule:
            anchor = rule["annotations"]["runbook_url"].partition("#")[2]
            assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/runbook.md"


def test_rules_reference_only_known_metrics() -> None:
    known = EXPORTED | PROMETHEUS_SERIES | recording_rule_names()
    for rule in load_rules():
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {sorted(unknown)}"


def test_slo_alerts_cover_every_window_pair() -> None:
    pairs = {
        (rule["alert"], rule["labels"]["severity"], rule["labels"]["long_window"],
         rule["labels"]["short_window"])
        for rule in load_rules()
        if rule.get("alert", "").endswith("SLOBudgetBurn")
    }  # fmt: skip
    for alert in ("DovecoteDeliverySLOBudgetBurn", "DovecoteAvailabilitySLOBudgetBurn"):
        assert {(alert, "page", "1h", "5m"), (alert, "page", "6h", "30m"),
                (alert, "ticket", "3d", "6h")} <= pairs  # fmt: skip


# ---------------------------------------------------------------- dashboard


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard["panels"]):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_queries_reference_only_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = EXPORTED | PROMETHEUS_SERIES | recording_rule_names()
    for where, expr in dashboard_queries(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert not names - known, f"{where}: unknown metrics {sorted(names - known)}"


def test_dashboard_shows_every_metric_and_both_error_budgets() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for _, expr in dashboard_queries(dashboard):
        used |= promql_metric_names(expr)
    shown = {
        metric
        for metric in DASHBOARD_MUST_SHOW
        if metric in used or any(f"{metric}{s}" in used for s in ("_bucket", "_sum", "_count"))
    }
    assert DASHBOARD_MUST_SHOW - shown == set(), "metrics missing from the dashboard"
    assert "dovecote:slo_delivery_error_budget:remaining_ratio30d" in used
    assert "dovecote:slo_availability_error_budget:remaining_ratio30d" in used


def test_metric_name_lexer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(x_bucket{route=~"$route"}'
        "[$__rate_interval]))) / on (job) group_left(kind) y:rec:ratio offset 1h "
        "or vector(0) and z > bool 1e3"
    )
    assert promql_metric_names(expr) == {"x_bucket", "y:rec:ratio", "z"}
