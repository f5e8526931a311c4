"""The Grafana dashboard charts only metrics and labels the operator exports
(trimtab.observability), and every query is valid PromQL (promtool parses each as a rule)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.validation import ROOT
from trimtab import observability

DASHBOARD = ROOT / "charts" / "trimtab" / "dashboards" / "trimtab.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Grafana's variables, replaced by values PromQL accepts so the queries can be parsed.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$": ""}


def exported() -> dict[str, set[str]]:
    """Sample name (as Prometheus stores it) -> label names, for every trimtab metric."""
    out: dict[str, set[str]] = {}
    for value in vars(observability).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for metric in value.describe():
            for suffix in SUFFIXES[metric.type]:
                out[metric.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) for every panel target and query variable."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"], ""))
    return out


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] == "trimtab-operator" and data["title"] == "trimtab"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in data["templating"]["list"]}
    assert names == {"datasource", "namespace", "name"}
    for panel in data["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_charts_every_operator_metric() -> None:
    used = {m for _, expr, _ in queries() for m in re.findall(r"\btrimtab_\w+", expr)}
    charted_families = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    for value in vars(observability).values():
        if isinstance(value, MetricWrapperBase):
            family = value.describe()[0].name
            assert any(c.startswith(family) for c in charted_families), family


@pytest.mark.parametrize(("title", "expr", "legend"), queries())
def test_query_uses_exported_metrics_and_labels(title: str, expr: str, legend: str) -> None:
    metrics = exported()
    used = re.findall(r"\btrimtab_\w+", expr)
    assert used, f"{title}: charts no trimtab metric"
    labels: set[str] = set()
    for name in used:
        assert name in metrics, f"{title}: {name} is not exported by trimtab.observability"
        labels |= metrics[name]
    referenced = set(re.findall(r"\{\{(\w+)\}\}", legend))
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        referenced |= {label.strip() for label in group.split(",")}
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        referenced |= set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", matcher))
    label_values = re.search(r"label_values\([^,]+,\s*(\w+)\)", expr)
    if label_values:
        referenced.add(label_values.group(1))
    assert referenced <= labels, f"{title}: labels {referenced - labels} are not exported"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (prometheus) not installed")
def test_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, (_, expr, _) in enumerate(queries()):
        if expr.startswith("label_values("):
            expr = re.sub(r"label_values\(([^,]+),\s*\w+\)", r"\1", expr)
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"trimtab:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
