"""The BentoML service as a real `bentoml serve` process, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator

from model import store
from model.precision import served_precisions
from tests.conftest import MONEY, QUESTION, QUESTION_ROWS, SPORT, STATEMENT, TOPIC_ROWS, micro_model
from tests.serving import bentoml_serve

API_KEY = "test-key-" + uuid.uuid4().hex
JWT_SECRET = "jwt-secret-" + uuid.uuid4().hex
TEXTS = SPORT + MONEY + QUESTION + STATEMENT


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """A three-task micro model registered under its own name in the test store."""
    length_rows = [(t, "short" if len(t) < 20 else "long") for t in TEXTS]
    with micro_model("ctt-serve", tmp_path_factory.mktemp("serve-data"),
                     {"topic": TOPIC_ROWS, "question": QUESTION_ROWS, "length": length_rows}) as name:
        yield name, store.get_version()


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    name, _ = served_model
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with bentoml_serve(env={"CTT_MODEL_NAME": name, "CTT_MAX_ITEMS": "16", "CTT_MAX_TEXT_CHARS": "500",
                            "API_KEY": "", "JWT_SECRET": "", "ENVIRONMENT": "test"},
                       log_path=log) as url:
        yield url, log


def classify(url, items, **kwargs):
    return httpx.post(f"{url}/classify", json={"items": items}, timeout=30, **kwargs)


async def _many(url: str, bodies: list[list[dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/classify", json={"items": b}) for b in bodies))


def test_concurrent_mixed_task_requests_match_the_in_process_model(server, served_model):
    url, _ = server
    model = served_model[1].load()
    tasks = model.task_names
    bodies = [[{"text": TEXTS[(i * 3 + j) % len(TEXTS)], "task": tasks[(i + j) % len(tasks)]} for j in range(1 + i % 3)]
              for i in range(96)]
    responses = asyncio.run(_many(url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    # Each task in the precision the service reports for it; int8 rows move slightly with their
    # neighbours in a pass (model/precision.py), fp32 rows only by float rounding.
    precisions = httpx.get(f"{url}/model").json()["precision"]["tasks"]
    for body, response in zip(bodies, responses):
        expected = model.predict([item["text"] for item in body], [item["task"] for item in body], precisions=precisions)
        for got, want in zip(response.json(), expected):
            assert got["task"] == want.task
            tolerance = 1e-4 if precisions[want.task] == "fp32" else 0.05
            assert got["score"] == pytest.approx(want.score, abs=tolerance)
            if precisions[want.task] == "fp32" or abs(want.score - 1 / len(model.task(want.task).labels)) > 0.05:
                assert got["label"] == want.label

    metrics = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^ctt_forward_batch_items_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^ctt_forward_batch_items_sum (\S+)", metrics, re.M).group(1))
    assert total == sum(len(b) for b in bodies)
    assert count < len(bodies), "requests were never merged into one forward pass"
    singles = float(re.search(r'^ctt_forward_batch_items_bucket\{le="1.0"\} (\S+)', metrics, re.M).group(1))
    assert singles < count, "no forward pass held more than one item"


def test_probabilities_on_request(server):
    url, _ = server
    got = classify(url, [{"text": "goal", "task": "topic", "probabilities": True}, {"text": "goal", "task": "topic"}]).json()
    assert set(got[0]["probabilities"]) == {"money", "sport"}
    assert sum(got[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert got[0]["probabilities"][got[0]["label"]] == pytest.approx(got[0]["score"])
    assert got[1]["probabilities"] is None


@pytest.mark.parametrize("body, fragment", [
    ({"items": [{"text": "goal", "task": "weather"}]}, "unknown task 'weather'; known tasks: topic, question, length"),
    ({"items": [{"text": "   ", "task": "topic"}]}, "text is empty"),
    ({"items": [{"text": "x" * 501, "task": "topic"}]}, "the limit is 500"),
    ({"items": []}, "at least 1 item"),
    ({"items": [{"text": "goal", "task": "topic"}] * 17}, "at most 16 items"),
    ({"items": [{"task": "topic"}]}, "Field required"),
    ({"items": [{"text": 5, "task": "topic"}]}, "valid string"),
    ({"items": [{"text": "goal", "task": "topic", "colour": "red"}]}, "Extra inputs are not permitted"),
    ({"things": []}, "Field required"),
])
def test_bad_input_is_a_400_that_names_the_item(server, body, fragment):
    url, _ = server
    response = httpx.post(f"{url}/classify", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert fragment in response.text


def test_malformed_json_is_a_4xx(server):
    url, _ = server
    response = httpx.post(f"{url}/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_a_bad_request_never_fails_its_batch_neighbours(server):
    url, _ = server
    good = [[{"text": t, "task": "topic"}] for t in SPORT]
    bad = [[{"text": "goal", "task": "nope"}], [{"text": "", "task": "topic"}]] * 5
    bodies = [b for pair in zip(good, bad) for b in pair]
    responses = asyncio.run(_many(url, bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == (200 if body in good else 400), response.text


def test_read_only_routes(server, served_model):
    url, _ = server
    version = served_model[1]
    tasks = httpx.get(f"{url}/tasks").json()
    assert tasks["version"] == version.tag
    assert [t["name"] for t in tasks["tasks"]] == ["topic", "question", "length"]
    assert all(0 <= t["accuracy"] <= 1 and t["labels"] for t in tasks["tasks"])
    card = httpx.get(f"{url}/model").json()
    assert card["tag"] == version.tag and card["parent"] == version.parent
    assert card["task_count"] == 3 and card["backbone"]["spec"] == "micro"
    assert card["metrics"]["bwt"] == 0.0 and card["environment"] == "test"
    # CTT_PRECISION=int8 (the default): int8 exactly where the record measured it within tolerance.
    record = version.record()
    assert card["precision"]["setting"] == "int8"
    assert card["precision"]["tasks"] == served_precisions("int8", ["topic", "question", "length"], record)
    # ... and why: the examples only fp32 and only int8 classified right, and the rule applied.
    evidence = card["precision"]["evidence"]
    assert set(evidence) == {"topic", "question", "length"}
    assert all(verdict["kept"] == (card["precision"]["tasks"][task] == "int8") for task, verdict in evidence.items())
    # Each task says how its scores are calibrated, as the version recorded it.
    assert [t["calibration"] for t in tasks["tasks"]] == [record["calibration"][t] for t in ("topic", "question", "length")]
    assert all(t["calibration"]["method"] == "temperature" and t["calibration"]["temperature"] >= 1
               for t in tasks["tasks"])
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/livez").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert f'ctt_model_info{{environment="test",tag="{version.tag}"}} 3.0' in metrics
    int8_tasks = list(card["precision"]["tasks"].values()).count("int8")
    assert f'ctt_served_tasks{{precision="int8"}} {float(int8_tasks)}' in metrics
    assert f'ctt_served_tasks{{precision="fp32"}} {float(3 - int8_tasks)}' in metrics
    assert "bentoml_service_request_duration_seconds" in metrics


def test_openapi_schema_is_served_and_valid(server):
    url, _ = server
    schema = httpx.get(f"{url}/docs.json").json()
    # BentoML labels its document 3.0.2 but fills it with pydantic's JSON Schema 2020-12
    # (null types, `examples` lists), including in its own built-in components: that is the
    # dialect of OpenAPI 3.1, so that is what the document is checked against.
    OpenAPIV31SpecValidator({**schema, "openapi": "3.1.0"}).validate()
    assert schema["openapi"].startswith("3.")
    classify_path = schema["paths"]["/classify"]["post"]
    assert "requestBody" in classify_path and "200" in classify_path["responses"]
    for path in ("/tasks", "/model", "/health"):
        assert path in schema["paths"], path


def test_logs_are_json_lines_with_request_ids(server):
    import json

    url, log = server
    classify(url, [{"text": "goal", "task": "topic"}])
    time.sleep(0.5)
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    access = [r for r in records if r["logger"] == "bentoml.access" and "/classify" in r["message"]]
    assert access and all({"timestamp", "level", "message", "request_id"} <= set(r) for r in access)
    assert any(r["logger"] == "ctt" and "ready" in r["message"] for r in records)


@pytest.fixture(scope="module")
def secured_server(served_model):
    name, _ = served_model
    with bentoml_serve(env={"CTT_MODEL_NAME": name, "API_KEY": API_KEY, "JWT_SECRET": JWT_SECRET}) as url:
        yield url


def test_auth_when_configured(secured_server):
    url = secured_server
    item = [{"text": "goal", "task": "topic"}]
    denied = classify(url, item)
    assert denied.status_code == 401 and "missing credentials" in denied.json()["error"]
    assert classify(url, item, headers={"X-API-Key": "wrong"}).status_code == 401
    assert classify(url, item, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert classify(url, item, headers={"X-API-Key": API_KEY}).status_code == 200
    assert classify(url, item, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    valid = jwt.encode({"sub": "tester", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
    assert classify(url, item, headers={"Authorization": f"Bearer {valid}"}).status_code == 200
    expired = jwt.encode({"sub": "tester", "exp": int(time.time()) - 60}, JWT_SECRET, algorithm="HS256")
    response = classify(url, item, headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401 and "expired" in response.json()["error"]
    forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "another-secret", algorithm="HS256")
    assert classify(url, item, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    no_expiry = jwt.encode({"sub": "x"}, JWT_SECRET, algorithm="HS256")
    assert classify(url, item, headers={"Authorization": f"Bearer {no_expiry}"}).status_code == 401
    assert httpx.get(f"{url}/tasks").status_code == 401
    for open_path in ("/livez", "/readyz", "/health", "/metrics"):
        assert httpx.get(f"{url}{open_path}").status_code == 200, open_path


def test_open_when_no_key_is_configured(server):
    url, log = server
    assert classify(url, [{"text": "goal", "task": "topic"}]).status_code == 200
    assert "neither API_KEY nor JWT_SECRET is set" in log.read_text()


def test_built_bento_serves(served_model, tmp_path):
    import subprocess

    from tests.serving import BENTOML, PROJECT

    name, version = served_model
    built = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=PROJECT, capture_output=True, text=True,
                           env={**os.environ, "CTT_MODEL_NAME": name}, timeout=300)
    assert built.returncode == 0, built.stderr
    bento_tag = built.stdout.strip().splitlines()[-1].replace("__tag__:", "")
    info = subprocess.run([BENTOML, "get", bento_tag, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert version.tag in info.stdout, "the bento must pin the exact model version"
    # The container imports from the bento alone (the checkout is not there): every tracked file
    # of the service's code must be inside it.
    bento_source = Path(os.environ["BENTOML_HOME"], "bentos", *bento_tag.split(":"), "src")
    tracked = subprocess.run(["git", "ls-files", "service.py", "model"], cwd=PROJECT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked and [path for path in tracked if not (bento_source / path).is_file()] == []
    # The bento's schema lists every API, so BentoML's tools and clients see them. (BentoML prints
    # through `rich`, which cuts lines at the terminal's width: a wide one keeps the YAML whole.)
    described = yaml.safe_load(subprocess.run([BENTOML, "get", bento_tag, "-o", "yaml"], capture_output=True,
                                              env={**os.environ, "COLUMNS": "10000"}, text=True, timeout=60,
                                              check=True).stdout)
    routes = {route["name"]: route["route"] for route in described["schema"]["routes"]}
    assert routes == {"classify": "/classify", "tasks": "/tasks", "model_card": "/model", "feedback": "/feedback",
                      "feedback_stats": "/feedback/stats", "forward_pass": "/internal/forward-pass"}
    # Inside a bento only its own models exist: a later version in the store must not leak in.
    with bentoml_serve(bento_tag, env={"CTT_MODEL_NAME": name}) as url:
        assert httpx.get(f"{url}/model").json()["tag"] == version.tag
        assert classify(url, [{"text": "goal", "task": "question"}]).status_code == 200


def test_not_ready_until_the_model_is_loaded_and_warmed_up(served_model, monkeypatch):
    """In-process ASGI app, with the model load held back so the window can be observed."""
    import sys
    import threading

    from starlette.testclient import TestClient

    from model.ctt import ContinualTinyTransformer

    name, version = served_model
    monkeypatch.setenv("CTT_MODEL_NAME", name)
    monkeypatch.setenv("MONITORING_ENABLED", "false")
    sys.modules.pop("service", None)
    import service

    release = threading.Event()
    real_load = ContinualTinyTransformer.load.__func__

    def held_load(cls, folder, max_tasks=None):
        assert release.wait(60)
        return real_load(cls, folder, max_tasks)

    monkeypatch.setattr(ContinualTinyTransformer, "load", classmethod(held_load))
    try:
        with TestClient(service.CTT.to_asgi()) as client:
            assert client.get("/livez").status_code == 200
            assert client.get("/readyz").status_code == 503
            assert client.get("/health").json()["status"] == "loading"
            assert "ctt_" not in client.get("/metrics").text  # MONITORING_ENABLED=false
            # Validation works before the model is loaded; classification waits for it.
            assert client.post("/classify", json={"items": [{"text": "a", "task": "nope"}]}).status_code == 400
            assert client.post("/classify", json={"items": [{"text": "a", "task": "topic"}]}).status_code == 503
            release.set()
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "never became ready"
                time.sleep(0.05)
            assert client.post("/classify", json={"items": [{"text": "goal", "task": "topic"}]}).status_code == 200
    finally:
        release.set()
        sys.modules.pop("service", None)


def test_manifest_probe_paths_are_served(server, tmp_path):
    """The paths the generated Deployments probe answer 200 on a real server."""
    from deploy import manifests

    url, _ = server
    container = manifests.deployment("blue")["spec"]["template"]["spec"]["containers"][0]
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"/livez", "/readyz"}
    for path in paths | {"/health", "/metrics"}:
        assert httpx.get(f"{url}{path}").status_code == 200, path


# ----- failing closed, credentials, limits and exposure (issue 8) -------------------------
def serve_and_fail(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """`bentoml serve` expected to refuse to start: its exit code and output."""
    from tests.serving import BENTOML, PROJECT, free_port

    return subprocess.run([BENTOML, "serve", "service:CTT", "--host", "127.0.0.1", "--port", str(free_port())],
                          cwd=PROJECT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("env, reason", [
    ({"ENVIRONMENT": "production"}, "ENVIRONMENT=production needs credentials"),
    ({"ENVIRONMENT": "staging", "API_KEY_FILE": "/nonexistent/api-key"}, "ENVIRONMENT=staging needs credentials"),
    ({"ENVIRONMENT": "production", "JWT_SECRET": "short"}, "JWT_SECRET has 5 bytes; HS256 needs at least 32"),
    ({"ENVIRONMENT": "prod", "API_KEY": "k"}, "ENVIRONMENT='prod': must be one of development, test, staging, production"),
    ({"CTT_MAX_ITEMS": "many"}, "CTT_MAX_ITEMS='many': must be a whole number"),
])
def test_refuses_to_start_with_one_readable_line(served_model, env, reason):
    name, _ = served_model
    result = serve_and_fail({"CTT_MODEL_NAME": name, "API_KEY": "", "JWT_SECRET": "", **env})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctt: refusing to start: ") and reason in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_api_keys_rotate_in_place_without_a_restart(served_model, tmp_path):
    """Production, keys in a mounted file: a key added works and a key removed stops working
    without a restart; an emptied file fails closed."""
    name, _ = served_model
    key_file = tmp_path / "api-key"
    old, new = "old-key-" + uuid.uuid4().hex, "new-key-" + uuid.uuid4().hex
    key_file.write_text(old + "\n")
    item = [{"text": "goal", "task": "topic"}]

    def status(key: str) -> int:
        return classify(url, item, headers={"X-API-Key": key}).status_code

    def eventually(check, seconds: float = 20) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.2)
        return False

    env = {"CTT_MODEL_NAME": name, "ENVIRONMENT": "production", "API_KEY": "", "JWT_SECRET": "",
           "API_KEY_FILE": str(key_file), "CTT_CREDENTIALS_RELOAD_S": "1", "CTT_WORKERS": "2",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'feedback.db'}"}
    with bentoml_serve(env=env) as url:
        assert status(old) == 200 and status(new) == 401 and classify(url, item).status_code == 401
        # Kubernetes swaps the file (a new inode), as an atomic rename does.
        (tmp_path / "next").write_text(f"# rotated\n{old}\n{new}\n")
        os.replace(tmp_path / "next", key_file)
        assert eventually(lambda: status(new) == 200 and status(old) == 200)
        (tmp_path / "next").write_text(f"{new}\n")
        os.replace(tmp_path / "next", key_file)
        assert eventually(lambda: status(old) == 401)
        assert all(status(new) == 200 for _ in range(6)), "every worker must have the new keys"
        key_file.write_bytes(new.encode() + b" \xff\xfe\n")
        # Keys that cannot be read authenticate nobody: 503 with Retry-After, and the pod not Ready
        # (it was 500 on every call while /readyz stayed 200).
        # Each worker re-reads the file on its own clock: check the refusal a worker gave, not the
        # next answer (which may come from a worker that has not looked yet).
        refusals = []
        assert eventually(lambda: refusals.append(classify(url, item, headers={"X-API-Key": new}))
                          or refusals[-1].status_code == 503)
        refused = refusals[-1]
        assert refused.headers["retry-after"] and "cannot read its credentials" in refused.json()["error"]
        assert eventually(lambda: httpx.get(f"{url}/readyz").status_code == 503)
        key_file.write_text(f"{new}\n")
        assert eventually(lambda: status(new) == 200 and httpx.get(f"{url}/readyz").status_code == 200)
        key_file.write_text("")
        assert eventually(lambda: status(new) == 401), "an emptied Secret must not open the API"
        assert classify(url, item).status_code == 401


def test_limits_agree_and_unknown_values_are_echoed_short(server):
    url, _ = server
    zero_width = classify(url, [{"text": "\u200b\u200d\ufeff \u2060", "task": "topic"}])
    assert zero_width.status_code == 400 and "no visible characters" in zero_width.text
    long_task = "t" * 5000
    response = classify(url, [{"text": "goal", "task": long_task}])
    assert response.status_code == 400 and "at most 64 characters" in response.text
    assert long_task not in response.text and len(response.text) < 1000
    unknown = "weather-" + "x" * 50
    response = classify(url, [{"text": "goal", "task": unknown}])
    assert response.status_code == 400 and "unknown task 'weather-" in response.text and unknown not in response.text


def test_bodies_over_the_limit_are_a_413_however_they_are_sent(server):
    from model.settings import default

    url, _ = server
    limit = default("CTT_MAX_BODY_BYTES")
    big = json.dumps({"items": [{"text": "x" * 400, "task": "topic"}] * 4000}).encode()
    assert len(big) > limit
    declared = httpx.post(f"{url}/classify", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert declared.status_code == 413 and str(limit) in declared.json()["error"]

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    chunked = httpx.post(f"{url}/classify", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    assert classify(url, [{"text": "goal", "task": "topic"}]).status_code == 200


def test_oversized_request_headers_are_refused_before_anything_holds_them(server):
    """A header section of any size must not be buffered: uvicorn's h11 parser refuses one above
    16 KiB. (With httptools installed uvicorn has no such limit: a 32 MiB header was accepted, and
    no middleware of ours runs before headers are complete.)"""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url := server[0])
    reply = b""
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        try:
            connection.sendall(b"GET /livez HTTP/1.1\r\nHost: ctt\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
        except OSError:
            pass  # the server closed the connection while we were still sending: refused
        try:
            reply = connection.recv(4096)
        except OSError:
            pass
    assert not reply.startswith(b"HTTP/1.1 2"), reply[:200]
    assert httpx.get(f"{url}/livez").status_code == 200


def test_served_routes_are_exactly_the_declared_public_and_internal_paths(server):
    """The Ingress lists PUBLIC_API_PATHS: no route may be served that is in neither list."""
    from model.serving.routes import INTERNAL_PATHS, PUBLIC_API_PATHS

    url, _ = server
    served = set(httpx.get(f"{url}/docs.json").json()["paths"])
    assert set(PUBLIC_API_PATHS) <= served
    assert served - set(PUBLIC_API_PATHS) <= set(INTERNAL_PATHS), served


def test_health_hides_the_load_exception(served_model, monkeypatch, caplog):
    import sys

    from starlette.testclient import TestClient

    from model.ctt import ContinualTinyTransformer

    name, _ = served_model
    monkeypatch.setenv("CTT_MODEL_NAME", name)
    monkeypatch.setenv("MONITORING_ENABLED", "false")
    sys.modules.pop("service", None)
    import service

    def broken(cls, folder, max_tasks=None):
        raise OSError(f"/very/secret/path/{folder.name}/tasks.safetensors: disk on fire")

    monkeypatch.setattr(ContinualTinyTransformer, "load", classmethod(broken))
    try:
        with TestClient(service.CTT.to_asgi()) as client:
            deadline = time.monotonic() + 30
            while client.get("/health").json()["status"] == "loading":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert "secret" not in health.text and "disk on fire" not in health.text
    finally:
        sys.modules.pop("service", None)
