"""Smoke and integration checks against a running CTT service, shipped in the package so that
`ctt check` and `ctt deploy release` work from an installed wheel.

    ctt check smoke --url http://127.0.0.1:3000 --api-key "$API_KEY"        (seconds)
    ctt check integration --environment staging --model-tag ctt:abc123      (under a minute)

Smoke: alive, ready, healthy, metrics, every task answers, auth and bad input refused.
Integration: the smoke checks plus concurrency, every kind of bad input, probabilities, metrics,
the model card and the OpenAPI document.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TextIO

import httpx

from model.errors import CTTError

class CheckFailed(Exception):
    pass


class CheckSkipped(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Target:
    url: str
    api_key: str | None
    timeout: float
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        self.client = httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def classify(self, items: list[dict], **kwargs) -> httpx.Response:
        return self.client.post("/classify", json={"items": items}, **kwargs)


def run_checks(title: str, target: Target, checks: list[tuple[str, Callable[[Target], str]]],
               stream: TextIO | None = None) -> list[str]:
    """Run every check and print a table; returns "name: why" for each check that failed."""
    stream = stream or sys.stdout
    print(f"{title} against {target.url}", file=stream)
    rows, failures = [], []
    for name, check in checks:
        started = time.perf_counter()
        try:
            detail, status = check(target) or "", "PASS"
        except CheckSkipped as skip:
            detail, status = str(skip), "SKIP"
        except CheckFailed as failure:
            detail, status = str(failure), "FAIL"
        except httpx.HTTPError as error:
            detail, status = f"{type(error).__name__}: {error}", "FAIL"
        except (KeyError, TypeError, ValueError) as error:  # an answer of the wrong shape
            detail, status = f"unexpected answer ({type(error).__name__}: {error})", "FAIL"
        if status == "FAIL":
            failures.append(f"{name}: {detail}")
        rows.append((name, status, f"{1000 * (time.perf_counter() - started):.0f}", detail))
    widths = [max(len(str(row[i])) for row in rows + [("check", "result", "ms", "")]) for i in range(3)]
    print(f"{'check'.ljust(widths[0])}  {'result'.ljust(widths[1])}  {'ms'.rjust(widths[2])}  detail", file=stream)
    for name, status, ms, detail in rows:
        print(f"{name.ljust(widths[0])}  {status.ljust(widths[1])}  {ms.rjust(widths[2])}  {detail}", file=stream)
    passed = sum(row[1] == "PASS" for row in rows)
    skipped = sum(row[1] == "SKIP" for row in rows)
    print(f"{passed} passed, {len(failures)} failed" + (f", {skipped} skipped" if skipped else ""), file=stream)
    return failures


# ----- smoke checks ------------------------------------------------------------
SAMPLE_TEXT = "Shares in the bank rose sharply after the chancellor's budget speech."


def check_liveness(target: Target) -> str:
    response = target.get("/livez")
    expect(response.status_code == 200, f"/livez answered {response.status_code}")
    return "live"


def check_readiness(target: Target) -> str:
    response = target.get("/readyz")
    expect(response.status_code == 200, f"/readyz answered {response.status_code}: {response.text[:120]}")
    return "ready"


def check_health(target: Target) -> str:
    response = target.get("/health")
    expect(response.status_code == 200, f"/health answered {response.status_code}: {response.text[:120]}")
    body = response.json()
    expect(body.get("status") == "ok", f"/health status is {body.get('status')!r}")
    return f"model {body.get('model')}"


def check_metrics(target: Target) -> str:
    response = target.get("/metrics")
    expect(response.status_code == 200, f"/metrics answered {response.status_code}")
    for series in ("ctt_model_info", "bentoml_service_request_duration_seconds"):
        expect(series in response.text, f"/metrics lacks {series}")
    return "ctt_* and bentoml_* series present"


def fetch_tasks(target: Target) -> list[dict]:
    response = target.get("/tasks")
    expect(response.status_code == 200, f"/tasks answered {response.status_code}: {response.text[:120]}")
    tasks = response.json()["tasks"]
    expect(bool(tasks), "/tasks lists no task")
    return tasks


def check_tasks(target: Target) -> str:
    return ", ".join(task["name"] for task in fetch_tasks(target))


def check_classify_every_task(target: Target) -> str:
    tasks = fetch_tasks(target)
    response = target.classify([{"text": SAMPLE_TEXT, "task": task["name"]} for task in tasks])
    expect(response.status_code == 200, f"/classify answered {response.status_code}: {response.text[:200]}")
    results = response.json()
    expect(len(results) == len(tasks), f"{len(results)} results for {len(tasks)} items")
    for task, result in zip(tasks, results):
        expect(result["task"] == task["name"], f"result for {result['task']!r} in {task['name']!r}'s place")
        expect(result["label"] in task["labels"], f"{task['name']}: label {result['label']!r} not a task label")
        expect(0.0 <= result["score"] <= 1.0, f"{task['name']}: score {result['score']} outside [0, 1]")
    return "; ".join(f"{r['task']}={r['label']}" for r in results)


def check_auth_failure(target: Target) -> str:
    if not target.api_key:
        raise CheckSkipped("no API key given (--api-key or $API_KEY), so the service is assumed open")
    response = httpx.post(f"{target.url.rstrip('/')}/classify", timeout=target.timeout,
                          json={"items": [{"text": SAMPLE_TEXT, "task": "any"}]},
                          headers={"X-API-Key": "wrong-" + target.api_key[:4]})
    expect(response.status_code == 401, f"a wrong key got {response.status_code}, expected 401")
    return "wrong key refused with 401"


def check_bad_input(target: Target) -> str:
    response = target.classify([{"text": SAMPLE_TEXT, "task": "no-such-task-xyz"}])
    expect(response.status_code == 400, f"an unknown task got {response.status_code}, expected 400")
    expect("unknown task" in response.text, "the 400 does not say the task is unknown")
    return "unknown task refused with 400"


SMOKE_CHECKS = [
    ("liveness", check_liveness),
    ("readiness", check_readiness),
    ("health", check_health),
    ("metrics", check_metrics),
    ("tasks", check_tasks),
    ("classify every task", check_classify_every_task),
    ("auth failure", check_auth_failure),
    ("bad input", check_bad_input),
]



# ----- integration checks ----------------------------------------------------------------
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



def served_model_tag(target: Target) -> str:
    response = target.get("/model")
    expect(response.status_code == 200, f"/model answered {response.status_code}: {response.text[:120]}")
    return response.json()["tag"]


def check_model_tag(expected: str) -> Callable[[Target], str]:
    """The release gate: the service must serve exactly the model version the release names."""
    def check(target: Target) -> str:
        served = served_model_tag(target)
        expect(served == expected, f"/model reports {served}, expected {expected}")
        return served
    return check


SUITES = {"smoke": SMOKE_CHECKS, "integration": INTEGRATION_CHECKS}
# `--environment local` is a laptop's `make serve`; the others are the Ingress hosts of deploy/spec.py.
LOCAL_URL = "http://127.0.0.1:3000"


def environment_url(name: str) -> str:
    from deploy.spec import ENVIRONMENTS

    if name == "local":
        return LOCAL_URL
    if name not in ENVIRONMENTS:
        raise CTTError(f"unknown environment {name!r}; choose from local, {', '.join(ENVIRONMENTS)}")
    return f"https://{ENVIRONMENTS[name].host}"


def suite(name: str, model_tag: str | None = None) -> list[tuple[str, Callable[[Target], str]]]:
    return SUITES[name] + ([("model tag", check_model_tag(model_tag))] if model_tag else [])


def cmd_check(args) -> int:
    url = args.url or environment_url(args.environment)
    failures = run_checks(f"{args.suite} checks", Target(url, args.api_key, args.timeout),
                          suite(args.suite, args.model_tag))
    return 1 if failures else 0


def add_check_arguments(parser) -> None:
    parser.add_argument("suite", choices=list(SUITES), help="smoke (seconds) or integration (under a minute)")
    parser.add_argument("--url", help="base URL of the service (overrides --environment)")
    parser.add_argument("--environment", default="local",
                        help="local (http://127.0.0.1:3000) or an environment's public host from deploy/spec.py")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY") or None,
                        help="API key (default: $API_KEY); the auth check needs one")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--model-tag", help="also require /model to report this version")
    parser.set_defaults(run=cmd_check)


def add_check_parser(sub) -> None:
    add_check_arguments(sub.add_parser("check", help="smoke or integration checks against a running service"))


def main(argv: list[str] | None = None, suite_name: str | None = None) -> int:
    """For the thin wrappers in scripts/: `python scripts/smoke_tests.py --url ...`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_check_arguments(parser)
    args = parser.parse_args(([suite_name] if suite_name else []) + list(sys.argv[1:] if argv is None else argv))
    try:
        return args.run(args)
    except CTTError as problem:
        print(f"ctt: error: {problem}", file=sys.stderr)
        return 2
