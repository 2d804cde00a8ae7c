"""What model/bentoml_internals.py relies on in BentoML, checked against the installed BentoML: an
upgrade that changes any of it fails here, not in a deployment."""

from __future__ import annotations

import inspect
import logging

import bentoml


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
