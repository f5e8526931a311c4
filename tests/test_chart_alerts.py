"""trimtab's alerts (charts/trimtab/alerts/trimtab.rules.yaml and the chart's PrometheusRule):
they read only what the operator exports, the chart ships them as they are written, and each
fires when it should and not otherwise, as Prometheus evaluates it (`promtool test rules`, on
series given minute by minute)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart_render import one, render
from tests.test_chart_dashboard import exported
from tests.validation import ROOT, thirdparty, validate_custom

RULES = ROOT / "charts" / "trimtab" / "alerts" / "trimtab.rules.yaml"
PROMETHEUSRULE_CRD = thirdparty("prometheus-operator", "monitoring.coreos.com_prometheusrules.yaml")
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (prometheus) not installed"
)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_chart_ships_the_rules_as_written() -> None:
    extra = {"team": "ml", "severity": "page"}
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "prom"},
                                 "additionalRuleLabels": extra}}  # fmt: skip
    rule = one(render(values), "PrometheusRule")
    validate_custom(rule, PROMETHEUSRULE_CRD)
    assert rule["metadata"]["labels"]["release"] == "prom"
    shipped = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert len(shipped) == len(rules())
    for mine, theirs in zip(rules(), shipped, strict=True):
        # Every field as written, and the extra labels beside the alert's own severity.
        assert {k: v for k, v in theirs.items() if k != "labels"} == {
            k: v for k, v in mine.items() if k != "labels"
        }
        assert theirs["labels"] == {"team": "ml", **mine["labels"]}
    assert [d for d in render() if d["kind"] == "PrometheusRule"] == []


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_reads_exported_metrics_and_labels(rule: dict[str, Any]) -> None:
    metrics = exported()
    used = re.findall(r"\btrimtab_\w+", rule["expr"])
    assert used, rule["alert"]
    labels: set[str] = set()
    for name in used:
        assert name in metrics, f"{rule['alert']}: {name} is not exported"
        labels |= metrics[name]
    referenced = set(re.findall(r"\$labels\.(\w+)", yaml.safe_dump(rule["annotations"])))
    for group in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
        referenced |= {label.strip() for label in group.split(",")}
    assert referenced <= labels, f"{rule['alert']}: {referenced - labels} are not exported"
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_rules_are_valid() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# (alert, input series {series: values in promtool's notation, one per minute},
#  [(eval minute, label sets expected to fire)]). `_` is no sample; `AxN` N more of A;
# `A+BxN` N steps of B from A.
CASES: list[tuple[str, dict[str, str], list[tuple[int, list[dict[str, str]]]]]] = [
    ("TrimtabOperatorDown",
     {'trimtab_build_info{version="0.1.0"}': "1x5 _x40"},
     [(3, []), (15, []), (25, [{}])]),
    ("TrimtabMetricsUnavailable",
     {'trimtab_metrics_available{namespace="ml", name="chat"}': "1x3 0x20",
      'trimtab_metrics_available{namespace="ml", name="ok"}': "1x23"},
     [(8, []), (15, [{"namespace": "ml", "name": "chat"}])]),
    ("TrimtabRouteNotAccepted",
     {'trimtab_route_accepted{namespace="ml", name="chat"}': "1 1 0x20",
      'trimtab_route_accepted{namespace="ml", name="ok"}': "1x22",
      'trimtab_route_accepted{namespace="ml", name="unreported"}': "-1x22"},
     [(4, []), (9, [{"namespace": "ml", "name": "chat"}])]),
    ("TrimtabRouteNotReported",
     {'trimtab_route_accepted{namespace="ml", name="chat"}': "-1x45"},
     [(20, []), (35, [{"namespace": "ml", "name": "chat"}])]),
    # "old" has had a fallback before the window; another comes at 21m. "new" starts at 0
    # (its rollout began at 21m) and has its first rollback at 26m. "seen" is an operator a
    # new Prometheus first scrapes with a rollback long ago: not news.
    ("TrimtabRolledBack",
     {'trimtab_rollbacks_total{namespace="ml", name="old", kind="fallback"}': "1x20 2x25",
      'trimtab_rollbacks_total{namespace="ml", name="new", kind="rollback"}': "_x20 0x5 1x20",
      'trimtab_rollbacks_total{namespace="ml", name="seen", kind="rollback"}': "_x10 3x35"},
     [(17, []),
      (23, [{"namespace": "ml", "name": "old", "kind": "fallback"}]),
      (28, [{"namespace": "ml", "name": "new", "kind": "rollback"},
            {"namespace": "ml", "name": "old", "kind": "fallback"}]),
      (44, [])]),
    ("TrimtabReconcileErrors",
     {'trimtab_reconcile_total{kind="ModelDeployment", result="error"}': "0+1x40",
      'trimtab_reconcile_total{kind="TrainingJob", result="error"}': "0+1x5 6x35",
      'trimtab_reconcile_total{kind="TrainingJob", result="ok"}': "0+10x40"},
     [(10, []), (25, [{"kind": "ModelDeployment"}])]),
    ("TrimtabApiRequestsRefused",
     {'trimtab_api_requests_total{method="PATCH", code="403"}': "0+1x40",
      'trimtab_api_requests_total{method="PATCH", code="409"}': "0+5x40",
      'trimtab_api_requests_total{method="GET", code="200"}': "0+50x40"},
     [(10, []), (25, [{"method": "PATCH", "code": "403"}])]),
    ("TrimtabInPlaceResizeRefused",
     {'trimtab_in_place_resizes_total{namespace="ml", name="chat", result="forbidden"}':
          "0x3 1x45",
      'trimtab_in_place_resizes_total{namespace="ml", name="chat", result="ok"}': "0+3x48"},
     [(2, []), (6, [{"namespace": "ml", "name": "chat", "result": "forbidden"}]), (45, [])]),
    ("TrimtabTrainingJobFailed",
     {'trimtab_trainingjob_status_phase{namespace="ml", name="sft", phase="Running"}':
          "1x5 0x10",
      'trimtab_trainingjob_status_phase{namespace="ml", name="sft", phase="Failed"}':
          "0x5 1x10",
      'trimtab_trainingjob_status_phase{namespace="ml", name="ok", phase="Succeeded"}': "1x15"},
     [(3, []), (7, [{"namespace": "ml", "name": "sft", "phase": "Failed"}])]),
    # "flaky" restarts every 10 minutes, "rare" twice in the hour.
    ("TrimtabTrainingJobRestarting",
     {'trimtab_trainingjob_restarts{namespace="ml", name="flaky"}':
          "0x9 1x9 2x9 3x9 4x9 5x9 6x9",
      'trimtab_trainingjob_restarts{namespace="ml", name="rare"}': "0x20 1x20 2x30"},
     [(20, []), (65, [{"namespace": "ml", "name": "flaky"}])]),
    ("TrimtabTrainingJobWaiting",
     {'trimtab_trainingjob_status_phase{namespace="ml", name="big", phase="Queued"}': "1x400",
      'trimtab_trainingjob_status_phase{namespace="ml", name="ran", phase="Queued"}':
          "1x60 0x340"},
     [(300, []), (370, [{"namespace": "ml", "name": "big", "phase": "Queued"}])]),
]  # fmt: skip


def expected_annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with `{{ $labels.x }}` filled in, as Prometheus expands them."""
    return {
        key: re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], text)
        for key, text in rule["annotations"].items()
    }


def test_every_alert_has_cases() -> None:
    assert {case[0] for case in CASES} == {r["alert"] for r in rules()}


@needs_promtool
@pytest.mark.parametrize(("alert", "series", "evals"), CASES, ids=[c[0] for c in CASES])
def test_alert_fires_when_it_should(
    alert: str,
    series: dict[str, str],
    evals: list[tuple[int, list[dict[str, str]]]],
    tmp_path: Path,
) -> None:
    (rule,) = [r for r in rules() if r["alert"] == alert]
    checks = []
    for minute, firing in evals:
        expected = []
        for labels in firing:
            full = {**labels, **rule["labels"]}
            expected.append(
                {"exp_labels": full, "exp_annotations": expected_annotations(rule, labels)}
            )
        checks.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected})
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": checks,
            }
        ],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
