#!/usr/bin/env python
"""Integration tests: the smoke checks plus behaviour under concurrency, every kind of bad input,
probabilities, metrics and the OpenAPI document (under a minute).

    python scripts/integration_tests.py --environment staging
    python scripts/integration_tests.py --url http://127.0.0.1:3000 --api-key "$API_KEY"
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks import SAMPLE_TEXT, SMOKE_CHECKS, Target, expect, fetch_tasks, main_for  # noqa: E402

TEXTS = [
    SAMPLE_TEXT,
    "The striker scored twice as the home side won the cup final.",
    "A new smartphone with a faster chip goes on sale next week",
    "The minister faced questions from MPs about the election plans.",
    "The film won three awards at the ceremony on Sunday night.",
    "Oil prices fell",
]


def check_concurrent_mixed_tasks(target: Target) -> str:
    tasks = [task["name"] for task in fetch_tasks(target)]
    items = [{"text": TEXTS[i % len(TEXTS)], "task": tasks[i % len(tasks)]} for i in range(48)]
    expected = {}
    for item in items[: len(TEXTS) * len(tasks)]:
        key = (item["text"], item["task"])
        if key not in expected:
            response = target.classify([item])
            expect(response.status_code == 200, f"sequential request answered {response.status_code}")
            expected[key] = response.json()[0]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda item: target.classify([item]), items))
    for item, response in zip(items, responses):
        expect(response.status_code == 200, f"concurrent request answered {response.status_code}: {response.text[:120]}")
        got, want = response.json()[0], expected.get((item["text"], item["task"]))
        if want:
            expect(got["label"] == want["label"], f"{item['task']}: {got['label']!r} concurrently, {want['label']!r} alone")
            expect(abs(got["score"] - want["score"]) < 1e-3, f"{item['task']}: score differs under batching")
    return f"{len(items)} concurrent requests over {len(tasks)} tasks agree with sequential answers"


def check_probabilities(target: Target) -> str:
    tasks = fetch_tasks(target)
    response = target.classify([{"text": SAMPLE_TEXT, "task": t["name"], "probabilities": True} for t in tasks])
    expect(response.status_code == 200, f"/classify answered {response.status_code}")
    for task, result in zip(tasks, response.json()):
        probabilities = result["probabilities"]
        expect(set(probabilities) == set(task["labels"]), f"{task['name']}: probabilities for the wrong labels")
        expect(abs(sum(probabilities.values()) - 1.0) < 1e-4, f"{task['name']}: probabilities do not sum to 1")
        expect(abs(max(probabilities.values()) - result["score"]) < 1e-6, f"{task['name']}: score is not the top probability")
    return "every task's probabilities cover its labels and sum to 1"


def check_bad_inputs(target: Target) -> str:
    task = fetch_tasks(target)[0]["name"]
    cases = {
        "empty text": {"items": [{"text": "  ", "task": task}]},
        "unknown task": {"items": [{"text": "x", "task": "no-such-task-xyz"}]},
        "no items": {"items": []},
        "too many items": {"items": [{"text": "x", "task": task}] * 5000},
        "missing text": {"items": [{"task": task}]},
        "extra field": {"items": [{"text": "x", "task": task, "colour": "red"}]},
        "wrong type": {"items": [{"text": 5, "task": task}]},
        "no items key": {"texts": ["x"]},
    }
    for name, body in cases.items():
        response = target.client.post("/classify", json=body)
        expect(response.status_code == 400, f"{name}: answered {response.status_code}, expected 400")
        expect("error" in response.json(), f"{name}: no error message in the 400")
    response = target.client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    expect(400 <= response.status_code < 500, f"malformed JSON: answered {response.status_code}")
    return f"{len(cases) + 1} kinds of bad input answered 4xx"


def check_model_card(target: Target) -> str:
    card = target.get("/model").json()
    tasks = target.get("/tasks").json()
    expect(card["tag"] == tasks["version"], "/model and /tasks disagree on the version")
    expect(card["task_count"] == len(tasks["tasks"]), "/model task count differs from /tasks")
    return f"{card['tag']} (parent {card.get('parent')}), backbone {card['backbone']['spec']}"


def _prediction_count(target: Target, task: str) -> float:
    text = target.get("/metrics").text
    match = re.search(rf'^ctt_predictions_total\{{task="{re.escape(task)}"\}} (\S+)', text, re.M)
    return float(match.group(1)) if match else 0.0


def check_metrics_count_predictions(target: Target) -> str:
    task = fetch_tasks(target)[0]["name"]
    before = _prediction_count(target, task)
    response = target.classify([{"text": t, "task": task} for t in TEXTS])
    expect(response.status_code == 200, f"/classify answered {response.status_code}")
    after = _prediction_count(target, task)
    expect(after - before >= len(TEXTS), f"ctt_predictions_total rose by {after - before}, expected {len(TEXTS)}")
    return f"ctt_predictions_total{{task={task}}} {before:.0f} -> {after:.0f}"


def check_openapi(target: Target) -> str:
    document = target.get("/docs.json").json()
    expect("/classify" in document.get("paths", {}), "the OpenAPI document lacks /classify")
    return f"OpenAPI {document.get('openapi')} with {len(document['paths'])} paths"


def check_latency(target: Target) -> str:
    task = fetch_tasks(target)[0]["name"]
    timings = []
    for i in range(20):
        started = time.perf_counter()
        response = target.classify([{"text": TEXTS[i % len(TEXTS)], "task": task}])
        timings.append(1000 * (time.perf_counter() - started))
        expect(response.status_code == 200, f"/classify answered {response.status_code}")
    timings.sort()
    return f"one item, sequential: p50 {statistics.median(timings):.1f} ms, p95 {timings[18]:.1f} ms (not a gate)"


INTEGRATION_CHECKS = SMOKE_CHECKS + [
    ("concurrent mixed tasks", check_concurrent_mixed_tasks),
    ("probabilities", check_probabilities),
    ("bad inputs", check_bad_inputs),
    ("model card", check_model_card),
    ("metrics count predictions", check_metrics_count_predictions),
    ("openapi", check_openapi),
    ("latency", check_latency),
]

if __name__ == "__main__":
    main_for("integration tests", __doc__, INTEGRATION_CHECKS)
