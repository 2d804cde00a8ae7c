"""Alerts, their unit tests, and the Grafana dashboard, on the metric names the service exports.

Service metrics (see model/serving/metrics.py and BentoML): bentoml_service_request_total and
bentoml_service_request_duration_seconds (labels endpoint, http_response_code), ctt_predictions_total
(task), ctt_forward_batch_items, ctt_forward_seconds, ctt_model_info. Resource alerts use cAdvisor
(container_*) and kube-state-metrics (kube_pod_*), which every kube-prometheus install scrapes.
"""

from __future__ import annotations

import json

from deploy.feedback_monitoring import feedback_alert_rules, feedback_panels, feedback_rule_tests
from deploy.manifests import labels
from deploy.spec import APP, RUNBOOK_URL, EnvironmentSpec

CLASSIFY = 'endpoint="/classify"'


def _pods(namespace: str) -> str:
    return f'namespace="{namespace}", pod=~"{APP}-(blue|green)-.*"'


def alert_rules(namespace: str) -> list[dict]:
    service = f'namespace="{namespace}", {CLASSIFY}'
    pods = _pods(namespace)
    container = f'{pods}, container="{APP}"'
    return [
        # 503 is deliberate shedding (queue full, model loading), counted by CTTSaturated instead.
        {"alert": "CTTHighErrorRate", "for": "5m", "labels": {"severity": "critical"},
         "expr": f'sum(rate(bentoml_service_request_total{{{service}, http_response_code=~"5..", '
                 f'http_response_code!="503"}}[5m]))'
                 f' / sum(rate(bentoml_service_request_total{{{service}}}[5m])) > 0.05',
         "annotations": {"summary": "More than 5 % of /classify requests fail with a server error",
                         "description": "{{ $value | humanizePercentage }} of requests failed over 5 minutes."}},
        {"alert": "CTTSaturated", "for": "10m", "labels": {"severity": "warning"},
         "expr": f'sum(rate(bentoml_service_request_total{{{service}, http_response_code="503"}}[5m]))'
                 f' / sum(rate(bentoml_service_request_total{{{service}}}[5m])) > 0.05',
         "annotations": {"summary": "More than 5 % of /classify requests are shed with 503: add capacity",
                         "description": "{{ $value | humanizePercentage }} of requests were refused over 5 minutes "
                                        "(queue full or model loading); raise the HPA maximum or replicas."}},
        {"alert": "CTTHighLatency", "for": "5m", "labels": {"severity": "warning"},
         "expr": f"sum(rate(bentoml_service_request_duration_seconds_sum{{{service}}}[5m]))"
                 f" / sum(rate(bentoml_service_request_duration_seconds_count{{{service}}}[5m])) > 0.2",
         "annotations": {"summary": "Average /classify latency above 200 ms",
                         "description": "Average latency is {{ $value | humanizeDuration }} over 5 minutes."}},
        {"alert": "CTTHighCPU", "for": "10m", "labels": {"severity": "warning"},
         "expr": f"sum by (pod) (rate(container_cpu_usage_seconds_total{{{container}}}[5m]))"
                 f' / sum by (pod) (kube_pod_container_resource_limits{{{container}, resource="cpu"}}) > 0.8',
         "annotations": {"summary": "Pod {{ $labels.pod }} uses more than 80 % of its CPU limit"}},
        {"alert": "CTTHighMemory", "for": "10m", "labels": {"severity": "warning"},
         "expr": f"sum by (pod) (container_memory_working_set_bytes{{{container}}})"
                 f' / sum by (pod) (kube_pod_container_resource_limits{{{container}, resource="memory"}}) > 0.8',
         "annotations": {"summary": "Pod {{ $labels.pod }} uses more than 80 % of its memory limit"}},
        {"alert": "CTTPodRestarting", "for": "0m", "labels": {"severity": "warning"},
         "expr": f"increase(kube_pod_container_status_restarts_total{{{container}}}[15m]) > 2",
         "annotations": {"summary": "Pod {{ $labels.pod }} restarted more than twice in 15 minutes"}},
        {"alert": "CTTCrashLooping", "for": "5m", "labels": {"severity": "critical"},
         "expr": f'max by (pod) (kube_pod_container_status_waiting_reason{{{container}, reason="CrashLoopBackOff"}}) == 1',
         "annotations": {"summary": "Pod {{ $labels.pod }} is in CrashLoopBackOff"}},
    ]


def runbook(alert: str) -> str:
    """The alert's section of the runbooks page: docs/operating.md titles each section with the
    alert's name alone, so GitHub's anchor for it is the name in lower case."""
    return f"{RUNBOOK_URL}#{alert.lower()}"


def rule_groups(namespace: str) -> dict:
    rules = alert_rules(namespace) + feedback_alert_rules(namespace)
    # Every alert links to what the on-call should do about it (Alertmanager and Grafana show it).
    rules = [{**rule, "annotations": {**rule["annotations"], "runbook_url": runbook(rule["alert"])}}
             for rule in rules]
    return {"groups": [{"name": f"{APP}.rules", "rules": rules}]}


def prometheus_rule(spec: EnvironmentSpec) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": APP, "labels": {**labels(), **spec.monitoring_labels}},
            "spec": rule_groups(spec.namespace)}


def _series(name: str, series_labels: dict, values: str) -> dict:
    rendered = ", ".join(f'{key}="{value}"' for key, value in series_labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def rule_tests(namespace: str, rules_file: str) -> dict:
    """promtool unit tests: every alert fires when it should and stays silent when it should not."""
    request = {"namespace": namespace, "endpoint": "/classify"}
    pod = {"namespace": namespace, "pod": f"{APP}-blue-7d9f-abcde", "container": APP}

    def requests(ok_per_min: int, failed_per_min: int, shed_per_min: int = 0) -> list[dict]:
        return [_series("bentoml_service_request_total", {**request, "http_response_code": "200"}, f"0+{ok_per_min}x30"),
                _series("bentoml_service_request_total", {**request, "http_response_code": "500"}, f"0+{failed_per_min}x30"),
                _series("bentoml_service_request_total", {**request, "http_response_code": "503"}, f"0+{shed_per_min}x30")]

    def latency(seconds_per_request: float) -> list[dict]:
        return [_series("bentoml_service_request_duration_seconds_sum", request, f"0+{60 * seconds_per_request}x30"),
                _series("bentoml_service_request_duration_seconds_count", request, "0+60x30")]

    def usage(cpu_cores: float, memory_bytes: int) -> list[dict]:
        return [_series("container_cpu_usage_seconds_total", pod, f"0+{60 * cpu_cores}x30"),
                _series("kube_pod_container_resource_limits", {**pod, "resource": "cpu"}, "2x30"),
                _series("container_memory_working_set_bytes", pod, f"{memory_bytes}x30"),
                _series("kube_pod_container_resource_limits", {**pod, "resource": "memory"}, f"{2 * 2**30}x30")]

    def case(series: list[dict], alert: str, fires: dict | None, at: str = "20m") -> dict:
        """``fires``: the alert's expected extra labels and annotations; None for silence."""
        expected = [] if fires is None else [{"exp_labels": fires["labels"], "exp_annotations": fires["annotations"]}]
        return {"interval": "1m", "input_series": series,
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}]}

    def pod_alert(severity: str, summary: str, **extra) -> dict:
        return {"labels": {"pod": pod["pod"], "severity": severity, **extra},
                "annotations": {"summary": summary.format(pod=pod["pod"])}}

    busy, idle = usage(1.8, int(1.8 * 2**30)), usage(0.5, 2**29)
    restarts = "kube_pod_container_status_restarts_total"
    waiting = "kube_pod_container_status_waiting_reason"
    crash = {**pod, "reason": "CrashLoopBackOff"}
    tests = [
        case(requests(90, 10), "CTTHighErrorRate", {"labels": {"severity": "critical"}, "annotations": {
            "summary": "More than 5 % of /classify requests fail with a server error",
            "description": "10% of requests failed over 5 minutes."}}),
        case(requests(99, 1), "CTTHighErrorRate", None),
        # Deliberate shedding is saturation, not an error.
        case(requests(70, 0, 30), "CTTHighErrorRate", None),
        case(requests(70, 0, 30), "CTTSaturated", {"labels": {"severity": "warning"}, "annotations": {
            "summary": "More than 5 % of /classify requests are shed with 503: add capacity",
            "description": "30% of requests were refused over 5 minutes (queue full or model loading); "
                           "raise the HPA maximum or replicas."}}),
        case(requests(99, 0, 1), "CTTSaturated", None),
        case(latency(0.35), "CTTHighLatency", {"labels": {"severity": "warning"}, "annotations": {
            "summary": "Average /classify latency above 200 ms",
            "description": "Average latency is 350ms over 5 minutes."}}),
        case(latency(0.05), "CTTHighLatency", None),
        case(busy, "CTTHighCPU", pod_alert("warning", "Pod {pod} uses more than 80 % of its CPU limit")),
        case(idle, "CTTHighCPU", None),
        case(busy, "CTTHighMemory", pod_alert("warning", "Pod {pod} uses more than 80 % of its memory limit")),
        case(idle, "CTTHighMemory", None),
        case([_series(restarts, pod, "0 0 1 2 3 4 5 5 5 5")], "CTTPodRestarting",
             pod_alert("warning", "Pod {pod} restarted more than twice in 15 minutes",
                       namespace=namespace, container=APP), "9m"),
        case([_series(restarts, pod, "0 0 0 1 1 1 1 1 1 1")], "CTTPodRestarting", None, "9m"),
        case([_series(waiting, crash, "1x10")], "CTTCrashLooping",
             pod_alert("critical", "Pod {pod} is in CrashLoopBackOff"), "8m"),
        case([_series(waiting, crash, "0x10")], "CTTCrashLooping", None, "8m"),
    ]
    tests += feedback_rule_tests(namespace)
    # promtool compares every annotation, so each firing case expects its alert's runbook too.
    for test in tests:
        for rule_test in test["alert_rule_test"]:
            for alert in rule_test["exp_alerts"]:
                alert["exp_annotations"]["runbook_url"] = runbook(rule_test["alertname"])
    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}


def dashboard(spec: EnvironmentSpec) -> dict:
    """A ConfigMap that Grafana's dashboard sidecar picks up (label grafana_dashboard=1)."""
    ns = f'namespace="{spec.namespace}"'
    panels = [
        ("Requests per second by endpoint", f"sum by (endpoint) (rate(bentoml_service_request_total{{{ns}}}[5m]))", "reqps"),
        ("Error ratio (5xx but 503)", f'sum(rate(bentoml_service_request_total{{{ns}, http_response_code=~"5..", '
                                      f'http_response_code!="503"}}[5m])) '
                                      f"/ sum(rate(bentoml_service_request_total{{{ns}}}[5m]))", "percentunit"),
        ("Shed ratio (503) and queued items", [
            f'sum(rate(bentoml_service_request_total{{{ns}, http_response_code="503"}}[5m])) '
            f"/ sum(rate(bentoml_service_request_total{{{ns}}}[5m]))", f"sum(ctt_queued_items{{{ns}}})"], "short"),
        ("Latency p50 / p95 / p99 (/classify)", [
            f"histogram_quantile({q}, sum by (le) (rate(bentoml_service_request_duration_seconds_bucket{{{ns}, {CLASSIFY}}}[5m])))"
            for q in (0.5, 0.95, 0.99)], "s"),
        ("Items per forward pass", f"sum(rate(ctt_forward_batch_items_sum{{{ns}}}[5m])) / sum(rate(ctt_forward_batch_items_count{{{ns}}}[5m]))", "short"),
        ("Forward pass seconds p95", f"histogram_quantile(0.95, sum by (le) (rate(ctt_forward_seconds_bucket{{{ns}}}[5m])))", "s"),
        ("Predictions per second by task", f"sum by (task) (rate(ctt_predictions_total{{{ns}}}[5m]))", "reqps"),
    ]
    panels += feedback_panels(ns)
    grafana_panels = []
    for index, (title, queries, unit) in enumerate(panels):
        queries = queries if isinstance(queries, list) else [queries]
        grafana_panels.append({
            "id": index + 1, "type": "timeseries", "title": title,
            "gridPos": {"x": 12 * (index % 2), "y": 8 * (index // 2), "w": 12, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + i), "expr": q, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, q in enumerate(queries)]})
    board = {"title": f"CTT ({spec.name})", "uid": f"ctt-{spec.name}", "schemaVersion": 39, "version": 1,
             "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "tags": ["ctt"],
             "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
             "panels": grafana_panels}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{APP}-dashboard", "labels": {**labels(), "grafana_dashboard": "1"}},
            "data": {"ctt-dashboard.json": json.dumps(board, indent=2)}}
