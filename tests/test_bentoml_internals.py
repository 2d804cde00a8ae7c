"""What model/bentoml_internals.py relies on in BentoML, checked against the installed BentoML: an
upgrade that changes any of it fails here, not in a deployment. The store's code imports no private
BentoML name of its own."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import bentoml
import pytest
from pydantic import BaseModel
from hypothesis import given, settings
from hypothesis import strategies as st

from model import bentoml_internals
from model.tags import PART_MAX_CHARS, part_problem

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"^\s*(from|import)\s+(bentoml\._internal|_bentoml_impl|_bentoml_sdk)\b", re.M)
PROJECT_CODE = ["model", "training", "deploy", "benchmarks", "scripts", "service.py"]


def test_the_store_folder_is_the_one_bentoml_uses():
    assert bentoml_internals.model_store_dir() == Path(os.environ["BENTOML_HOME"]) / "models"


def test_a_version_written_with_the_adapter_is_read_back_by_bentoml_unchanged(tmp_path):
    name = f"ctt-internals-{uuid.uuid4().hex[:8]}"
    info = bentoml_internals.new_model_info(bentoml.Tag(name).make_new_version(), {"stage": "development"},
                                            {"parent": "x:y", "tasks": ["a", "b"], "accuracy": {"a": 0.5}})
    signed = bentoml_internals.model_info_with_metadata(info, {**info.metadata, "manifest_sha256": "0" * 64})
    assert (signed.tag, signed.creation_time, dict(signed.labels)) == (info.tag, info.creation_time, dict(info.labels))
    folder = bentoml_internals.model_store_dir() / name / info.tag.version
    folder.mkdir(parents=True)
    try:
        with open(folder / "model.yaml", "w", encoding="utf-8") as stream:
            bentoml_internals.write_model_info(stream, signed)
        with open(folder / "model.yaml", encoding="utf-8") as stream:
            read = bentoml_internals.read_model_info(stream)
        seen = bentoml.models.get(str(info.tag))  # BentoML's own public reader
        for model_info in (read, seen.info):
            assert str(model_info.tag) == str(info.tag) and dict(model_info.labels) == {"stage": "development"}
            assert dict(model_info.metadata) == {**info.metadata, "manifest_sha256": "0" * 64}
            assert model_info.creation_time == info.creation_time
            assert model_info.creation_time.tzinfo is not None and model_info.creation_time <= datetime.now(timezone.utc)
            assert (model_info.module, model_info.api_version) == ("", "v1")
    finally:
        shutil.rmtree(folder.parent)


def test_a_malformed_model_yaml_raises_for_the_store_to_report(tmp_path):
    (tmp_path / "model.yaml").write_text("name: [unclosed\n")
    with pytest.raises(Exception):
        with open(tmp_path / "model.yaml", encoding="utf-8") as stream:
            bentoml_internals.read_model_info(stream)


@settings(max_examples=200, deadline=None, database=None)
@given(part=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-ABC/:", max_size=PART_MAX_CHARS + 2))
def test_every_tag_part_ctt_accepts_is_one_bentoml_accepts_unchanged(part):
    if part_problem(part) is not None:
        return
    tag = bentoml.Tag(part, part)
    assert (tag.name, tag.version) == (part, part)


def test_no_module_but_the_adapter_imports_a_private_bentoml_name():
    files = [path for entry in PROJECT_CODE for path in ([ROOT / entry] if entry.endswith(".py")
                                                          else sorted((ROOT / entry).rglob("*.py")))]
    assert ROOT / "model" / "store" / "versions.py" in files and ROOT / "training" / "backup.py" in files
    offenders = [str(path.relative_to(ROOT)) for path in files
                 if path.name != "bentoml_internals.py" and PRIVATE.search(path.read_text())]
    assert offenders == []


# ----- serving -------------------------------------------------------------------------------

def test_bentoml_builds_a_served_app_with_to_asgi_which_serve_inside_wraps():
    from _bentoml_impl.worker import service as worker

    from model.bentoml_internals import serve_inside

    assert "service.to_asgi(" in inspect.getsource(worker)

    @bentoml.service(name="wrapped")
    class Wrapped:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    @bentoml.service(name="untouched")
    class Untouched:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    class Layer:
        def __init__(self, app):
            self.app = app

    serve_inside(Wrapped, Layer)
    serve_inside(Wrapped, Layer)  # idempotent
    app = Wrapped.to_asgi()
    assert isinstance(app, Layer) and not isinstance(app.app, Layer)
    assert Wrapped.name == "wrapped" and list(Wrapped.apis) == ["echo"]
    assert not isinstance(Untouched.to_asgi(), Layer), "other services must be left as they are"


def test_serve_inside_builds_the_app_exactly_as_bentoml_s_to_asgi_does():
    """serve_inside's to_asgi repeats Service.to_asgi step by step to keep the factory: an upgrade
    that changes those steps must be looked at."""
    from _bentoml_sdk.service.factory import Service

    body = [line.strip() for line in inspect.getsource(Service.to_asgi).splitlines()[1:] if line.strip()]
    assert body == ["from _bentoml_impl.server.app import ServiceAppFactory", "self.inject_config()",
                    "factory = ServiceAppFactory(self, is_main=is_main)", "return factory()"]


@bentoml.service(name="batched")
class Batched:
    """A front API that reaches a batchable method in-process, as service.py's /classify does."""

    def __init__(self):
        self.passes: list[list[str]] = []

    @bentoml.api
    async def front(self, text: str) -> str:
        return (await bentoml_internals.call_batched(Batched, "double", [text]))[0]

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def double(self, texts: list[str]) -> list[str]:
        self.passes.append(list(texts))
        time.sleep(0.05)  # long enough for the concurrent calls to queue behind the first pass
        return [text * 2 for text in texts]


def test_call_batched_merges_concurrent_calls_in_bentoml_s_dispatcher_without_http():
    from starlette.testclient import TestClient

    bentoml_internals.serve_inside(Batched, lambda app: app)
    app = Batched.to_asgi()
    with TestClient(app):  # runs the app's startup: the service instance
        assert bentoml_internals.can_call_batched(Batched, bentoml.get_current_service())
        # Another instance (a local one, or one of an app built earlier) has no dispatcher here.
        assert not bentoml_internals.can_call_batched(Batched, Batched.inner())
        async def calls():
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://batched") as http:
                return await asyncio.gather(*(http.post("/front", json={"text": str(i)}) for i in range(20)))

        answers = asyncio.run(calls())
        assert [a.text for a in answers] == [str(i) * 2 for i in range(20)]
        passes = bentoml.get_current_service().passes
        assert sorted(t for p in passes for t in p) == sorted(str(i) for i in range(20))
        assert len(passes) < 20, "the dispatcher merged nothing"


def test_bentoml_s_dispatcher_learns_to_hold_lone_requests_after_load_unless_the_gate_keeps_waits_out():
    """BentoML's dispatcher holds a request while fewer than its learned wait would justify, that
    wait being the average a batch's first request waited lately (refreshed at most every 5 s). Under
    load that is most of a pass, which every lone request then waits after the load is gone.
    model/serving/batching.py's DispatcherGate lets requests in only while no pass is in flight, so
    the dispatcher never sees a wait to learn: if BentoML changes either behaviour, look again."""
    import random

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    from model.serving.batching import DispatcherGate

    pass_s = 0.05

    async def learned_wait(gated: bool) -> float:
        def shed():
            raise RuntimeError("shed")

        dispatcher = CorkDispatcher(max_latency_in_ms=60_000, max_batch_size=32, fallback=shed, get_batch_size=len)

        async def forward(calls):
            await asyncio.sleep(pass_s)
            return list(calls)

        call, gate = dispatcher(forward), DispatcherGate(32)
        stop = time.monotonic() + 6.0  # past the dispatcher's first refresh after its training

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                if gated:
                    async with gate.turn(1):
                        await call([seed])
                else:
                    await call([seed])
                await asyncio.sleep(rng.uniform(0, pass_s))  # clients send again at any moment of a pass

        await asyncio.gather(*(client(seed) for seed in range(16)))
        dispatcher.shutdown()
        return dispatcher.optimizer.wait

    async def both():
        return await asyncio.gather(learned_wait(gated=False), learned_wait(gated=True))

    ungated, gated = asyncio.run(both())
    assert ungated > pass_s / 4, ungated
    assert gated < pass_s / 20, gated


def test_a_request_cancelled_inside_bentoml_s_dispatcher_is_cancelled_not_shed():
    """BentoML's request timeout cancels the handler (and answers 504 itself); BentoML's dispatcher
    turns that cancellation into its "overloaded" error, which must not be counted as shedding."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher
    from bentoml.exceptions import ServiceUnavailable

    from model.serving.batching import DispatcherGate, through_the_gate

    async def scenario():
        def overloaded():
            raise ServiceUnavailable("process is overloaded")  # what BentoML's app gives its dispatchers

        dispatcher = CorkDispatcher(max_latency_in_ms=60_000, max_batch_size=32, fallback=overloaded,
                                    get_batch_size=len)
        in_pass, finish = asyncio.Event(), asyncio.Event()

        async def held_pass(calls):
            in_pass.set()
            await finish.wait()
            return list(calls)

        call = dispatcher(held_pass)
        gate = DispatcherGate(pass_items=32)
        first = asyncio.create_task(through_the_gate(gate, call, ["a"]))
        await in_pass.wait()
        second = asyncio.create_task(through_the_gate(gate, call, ["b"]))
        while not gate.waiting:
            await asyncio.sleep(0)
        first.cancel()  # inside the dispatcher, its pass running
        second.cancel()  # waiting at the gate
        results = await asyncio.gather(first, second, return_exceptions=True)
        finish.set()
        dispatcher.shutdown()
        return results, gate

    results, gate = asyncio.run(scenario())
    assert all(isinstance(result, asyncio.CancelledError) for result in results), results
    assert gate.inside == 0 and gate.waiting == 0


def test_bentoml_reports_api_exceptions_on_the_logger_we_filter():
    from bentoml._internal.server import http_app
    from starlette.requests import Request

    from model.bentoml_internals import API_EXCEPTION_LOGGER

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    target = logging.getLogger(API_EXCEPTION_LOGGER)
    handler = Keep()
    target.addHandler(handler)
    try:
        request = Request({"type": "http", "method": "POST", "path": "/classify", "headers": [],
                           "query_string": b"", "server": ("x", 80), "scheme": "http", "root_path": ""})
        try:
            raise ValueError("a client's body")
        except ValueError:
            http_app.log_exception(request)
    finally:
        target.removeHandler(handler)
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert records[0].args == ("/classify", "POST") and records[0].exc_info[0] is ValueError


class Answer(BaseModel):
    label: str


@bentoml.service
class Lists:
    @bentoml.api
    def answer(self, texts: list[str]) -> list[Answer]:
        return [Answer(label=text) for text in texts]

    @bentoml.api
    def text(self, text: str) -> str:
        return text


def test_an_output_media_type_set_once_is_what_bentoml_computes_and_spares_it_the_schema(monkeypatch):
    spec = Lists.apis["answer"].output_spec
    computed = {name: method.output_spec.mime_type() for name, method in Lists.apis.items()}
    assert bentoml_internals.fix_output_media_types(Lists) == computed == {"answer": "application/json",
                                                                          "text": "text/plain"}

    # What makes it pay: once set, BentoML answers the media type without generating the schema.
    def no_schema(*args, **kwargs):
        raise AssertionError("BentoML generated the output's JSON schema to find its media type")

    monkeypatch.setattr(spec, "model_json_schema", no_schema)
    assert spec.mime_type() == "application/json"
