"""Live accuracy from production feedback: the alert, its promtool unit tests and the dashboard
panels, on the series ``/feedback`` exports (model/serving/feedback.py): ``ctt_feedback_total{task,
source, agreed}`` and ``ctt_task_accuracy{task}``. ``deploy/monitoring.py`` adds them to the
PrometheusRule, its tests and the Grafana dashboard of every environment.

Only sampled reviews count: corrections come from users who saw a wrong answer, so their
agreement says nothing about accuracy. Rows without a served prediction (agreed="unknown")
count in neither the numerator nor the denominator.
"""

from __future__ import annotations

from deploy.spec import APP

# A day of reviews, at least this many of them, and a margin that sampling noise at that size
# rarely crosses (the standard error of 100 reviews at 90 % accuracy is 3 points).
WINDOW = "1d"
MIN_REVIEWS = 100
MARGIN = 0.05


def _reviews(namespace: str, agreed: str) -> str:
    return (f'sum by (task) (increase(ctt_feedback_total{{namespace="{namespace}", source="review", '
            f'agreed=~"{agreed}"}}[{WINDOW}]))')


def review_agreement(namespace: str) -> str:
    return f"{_reviews(namespace, 'true')} / {_reviews(namespace, 'true|false')}"


def measured_accuracy(namespace: str) -> str:
    # Both colours export it during a release; the higher is the stricter baseline.
    return f'max by (task) (ctt_task_accuracy{{namespace="{namespace}"}})'


SUMMARY = ("Task {{ $labels.task }}: reviewers agree with {{ $value | humanizePercentage }} of its predictions, "
           f"more than {round(MARGIN * 100)} points below the accuracy its version measured")
DESCRIPTION = (f"Sampled reviews (source=review) over {WINDOW}, at least {MIN_REVIEWS} of them. The data may have "
               "drifted: export the feedback (`ctt feedback export`) and learn the next version from it.")


def feedback_alert_rules(namespace: str) -> list[dict]:
    return [{
        "alert": "CTTLiveAccuracyBelowMeasured", "for": "15m", "labels": {"severity": "warning"},
        "expr": f"({review_agreement(namespace)}) < on (task) ({measured_accuracy(namespace)} - {MARGIN})"
                f" and on (task) ({_reviews(namespace, 'true|false')} >= {MIN_REVIEWS})",
        "annotations": {"summary": SUMMARY, "description": DESCRIPTION}}]


def feedback_rule_tests(namespace: str) -> list[dict]:
    """promtool cases: fires on a real drop over enough reviews; silent on a small drop, on too
    few reviews, and on corrections (however many disagree)."""
    pod = {"namespace": namespace, "pod": f"{APP}-blue-7d9f-abcde"}

    def series(name: str, labels: dict, values: str) -> dict:
        rendered = ", ".join(f'{key}="{value}"' for key, value in labels.items())
        return {"series": f"{name}{{{rendered}}}", "values": values}

    def feedback(agreed_per_min: float, disagreed_per_min: float, source: str = "review") -> list[dict]:
        labels = {**pod, "task": "topic", "source": source}
        return [series("ctt_feedback_total", {**labels, "agreed": "true"}, f"0+{agreed_per_min}x120"),
                series("ctt_feedback_total", {**labels, "agreed": "false"}, f"0+{disagreed_per_min}x120"),
                series("ctt_feedback_total", {**labels, "agreed": "unknown"}, "0+5x120"),
                series("ctt_task_accuracy", {**pod, "task": "topic"}, "0.94x120")]

    def case(series_list: list[dict], fires: bool) -> dict:
        expected = [{"exp_labels": {"task": "topic", "severity": "warning"}, "exp_annotations": {
            "summary": SUMMARY.replace("{{ $labels.task }}", "topic").replace(
                "{{ $value | humanizePercentage }}", "75%"),
            "description": DESCRIPTION}}] if fires else []
        return {"interval": "1m", "input_series": series_list,
                "alert_rule_test": [{"eval_time": "2h", "alertname": "CTTLiveAccuracyBelowMeasured",
                                     "exp_alerts": expected}]}

    return [
        case(feedback(3, 1), True),  # 75 % agreement against 94 % measured, ~480 reviews
        case(feedback(9, 1), False),  # 90 %: within the margin
        case(feedback(0.3, 0.1), False),  # 75 %, but under MIN_REVIEWS reviews
        case(feedback(1, 3, source="correction"), False),  # corrections never count
    ]


def feedback_panels(namespace_selector: str) -> list[tuple[str, str | list[str], str]]:
    """(title, queries, unit) rows in deploy/monitoring.py's dashboard format."""
    ns = namespace_selector
    reviews = (f'sum by (task) (increase(ctt_feedback_total{{{ns}, source="review", agreed=~"true|false"}}[{WINDOW}]))')
    agreed = f'sum by (task) (increase(ctt_feedback_total{{{ns}, source="review", agreed="true"}}[{WINDOW}]))'
    return [
        (f"Live accuracy: review agreement ({WINDOW}) and measured accuracy, by task",
         [f"{agreed} / {reviews}", f"max by (task) (ctt_task_accuracy{{{ns}}})"], "percentunit"),
        ("Feedback rows per second by task and source",
         f"sum by (task, source) (rate(ctt_feedback_total{{{ns}}}[5m]))", "reqps"),
    ]
