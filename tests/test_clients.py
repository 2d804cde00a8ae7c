"""CTT called with BentoML's own tools: its HTTP clients, and other services through
`bentoml.depends`, each against a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import re
import uuid

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from tests.conftest import QUESTION_ROWS, TOPIC_ROWS, micro_model
from tests.serving import bentoml_serve

API_KEY = "client-key-" + uuid.uuid4().hex
READER_KEY = "reader-key-" + uuid.uuid4().hex
REVIEWER_KEY = "reviewer-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    with micro_model("ctt-clients", tmp_path_factory.mktemp("clients-data"),
                     {"topic": TOPIC_ROWS, "question": QUESTION_ROWS}) as name:
        yield name


@pytest.fixture(scope="module")
def secured(model_name, tmp_path_factory):
    keys = (f"{API_KEY} id=client-test permissions=classify,feedback\n{READER_KEY} id=reader permissions=classify\n"
            f"{REVIEWER_KEY} id=reviewers permissions=classify,feedback,review")
    env = {"CTT_MODEL_NAME": model_name, "ENVIRONMENT": "test", "API_KEY": keys, "JWT_SECRET": "",
           "CTT_DATA_DIR": str(tmp_path_factory.mktemp("clients-feedback"))}
    with bentoml_serve(env=env) as url:
        yield url


def test_the_sync_client_calls_every_api_with_the_services_credentials(secured):
    with bentoml.SyncHTTPClient(secured, token=API_KEY) as client:
        assert {"classify", "tasks", "model_card", "feedback", "feedback_stats"} <= set(client.endpoints)
        predictions = client.classify(items=[{"text": "the striker scored", "task": "topic"},
                                             {"text": "what time is it?", "task": "question", "probabilities": True}])
        assert [p["task"] for p in predictions] == ["topic", "question"]
        assert predictions[0]["probabilities"] is None and set(predictions[1]["probabilities"]) == {"q", "s"}
        assert [t["name"] for t in client.tasks()["tasks"]] == ["topic", "question"]
        assert client.model_card()["task_count"] == 2
        assert client.feedback(items=[{"text": "goal", "task": "topic", "label": "sport", "id": "c1"}]) == {
            "stored": 1, "already_stored": 0}
        stats = client.feedback_stats(since="1h")
        assert stats["tasks"][0]["task"] == "topic" and stats["tasks"][0]["rows"] == 1
        with pytest.raises(BentoMLException) as refused:
            client.classify(items=[{"text": "goal", "task": "weather"}])
        assert refused.value.error_code == 400 and "unknown task 'weather'" in str(refused.value)
    with bentoml.SyncHTTPClient(secured) as anonymous:
        with pytest.raises(BentoMLException) as refused:
            anonymous.tasks()
        assert refused.value.error_code == 401


def test_each_credential_may_do_what_its_permissions_say(secured):
    """An ordinary key could relabel evaluation texts as trusted reviews (issue 20's poisoning):
    now reviews need the review permission, corrections the feedback permission."""
    review = {"text": "the striker scored", "task": "topic", "label": "money", "source": "review"}

    def post(key: str, items: list[dict]) -> httpx.Response:
        return httpx.post(f"{secured}/feedback", json={"items": items}, headers={"X-API-Key": key}, timeout=30)

    refused = post(API_KEY, [{"text": "goal", "task": "topic", "label": "sport"}, review])
    assert refused.status_code == 403 and "'review'" in refused.text, refused.text
    assert refused.json()["problems"][0]["loc"] == ["items", 1, "source"]
    reader = post(READER_KEY, [{"text": "goal", "task": "topic", "label": "sport"}])
    assert reader.status_code == 403 and "key:reader lacks the 'feedback' permission" in reader.json()["error"]
    assert httpx.get(f"{secured}/tasks", headers={"X-API-Key": READER_KEY}).status_code == 200
    assert post(REVIEWER_KEY, [{**review, "id": "review-1"}]).json() == {"stored": 1, "already_stored": 0}
    stats = httpx.get(f"{secured}/feedback/stats", headers={"X-API-Key": READER_KEY}).json()
    topic = next(task for task in stats["tasks"] if task["task"] == "topic")
    assert topic["sources"]["review"]["rows"] == 1


def test_the_async_client_batches_concurrent_calls(secured):
    async def run():
        async with bentoml.AsyncHTTPClient(secured, token=API_KEY) as client:
            return await asyncio.gather(*(client.classify(items=[{"text": f"goal number {i}", "task": "topic"}])
                                          for i in range(40)))

    answers = asyncio.run(run())
    assert all(len(answer) == 1 and answer[0]["task"] == "topic" for answer in answers)
    metrics = httpx.get(f"{secured}/metrics").text
    assert re.search(r'^bentoml_service_adaptive_batch_size_count\{[^}]*method_name="forward_pass"', metrics, re.M)


def test_a_service_that_depends_on_ctt_keeps_its_own_routes_and_metrics(model_name):
    """`bentoml.depends(CTT)`: BentoML runs CTT beside the caller and they talk over a Unix socket,
    so the caller needs no CTT credentials. Importing service.py once made every path it did not
    know a 404 in the caller's own worker (its route included)."""
    env = {"CTT_MODEL_NAME": model_name, "ENVIRONMENT": "test", "API_KEY": API_KEY, "JWT_SECRET": ""}
    with bentoml_serve("tests.composition:Caller", env=env) as url:
        answer = httpx.post(f"{url}/label", json={"text": "what time is it?", "task": "question"}, timeout=30)
        assert answer.status_code == 200 and answer.text in ("q", "s"), answer.text
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r'^bentoml_service_request_total\{endpoint="/label",http_response_code="200"', metrics, re.M)
        assert "-unknown-" not in metrics


def test_a_service_can_call_ctt_by_url_with_a_key(model_name, secured):
    env = {"CTT_MODEL_NAME": model_name, "ENVIRONMENT": "test", "CTT_URL": secured, "BENTO_CLOUD_API_KEY": API_KEY}
    with bentoml_serve("tests.composition:RemoteCaller", env=env) as url:
        answer = httpx.post(f"{url}/label", json={"text": "the striker scored", "task": "topic"}, timeout=30)
        assert answer.status_code == 200 and answer.text in ("sport", "money"), answer.text
