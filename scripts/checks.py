"""What the smoke and integration test scripts share: target resolution, HTTP, a result table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import yaml

ENVIRONMENTS_FILE = Path(__file__).with_name("environments.yaml")


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


def parse_target(description: str, argv: list[str] | None = None) -> Target:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--environment", default="local", help=f"a name from {ENVIRONMENTS_FILE.name}")
    parser.add_argument("--url", help="base URL (overrides --environment)")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY") or None,
                        help="API key (default: $API_KEY); the auth check needs one")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)
    if args.url:
        url = args.url
    else:
        environments = yaml.safe_load(ENVIRONMENTS_FILE.read_text())
        if args.environment not in environments:
            parser.error(f"unknown environment {args.environment!r}; known: {', '.join(environments)}")
        url = environments[args.environment]
    return Target(url, args.api_key, args.timeout)


def run_checks(title: str, target: Target, checks: list[tuple[str, Callable[[Target], str]]]) -> int:
    """Run every check, print a table, return the exit code (0 only if none failed)."""
    print(f"{title} against {target.url}")
    rows, failed = [], 0
    for name, check in checks:
        started = time.perf_counter()
        try:
            detail, status = check(target) or "", "PASS"
        except CheckSkipped as skip:
            detail, status = str(skip), "SKIP"
        except CheckFailed as failure:
            detail, status, failed = str(failure), "FAIL", failed + 1
        except httpx.HTTPError as error:
            detail, status, failed = f"{type(error).__name__}: {error}", "FAIL", failed + 1
        rows.append((name, status, f"{1000 * (time.perf_counter() - started):.0f}", detail))
    widths = [max(len(str(row[i])) for row in rows + [("check", "result", "ms", "")]) for i in range(3)]
    print(f"{'check'.ljust(widths[0])}  {'result'.ljust(widths[1])}  {'ms'.rjust(widths[2])}  detail")
    for name, status, ms, detail in rows:
        print(f"{name.ljust(widths[0])}  {status.ljust(widths[1])}  {ms.rjust(widths[2])}  {detail}")
    passed = sum(row[1] == "PASS" for row in rows)
    skipped = sum(row[1] == "SKIP" for row in rows)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


# ----- checks both scripts use ------------------------------------------------------------
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


def main_for(title: str, description: str, checks) -> None:
    target = parse_target(description)
    sys.exit(run_checks(title, target, checks))
