"""What model/bentoml_internals.py relies on in BentoML, checked against the installed BentoML: an
upgrade that changes any of it fails here, not in a deployment. The store's code imports no private
BentoML name of its own."""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
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
