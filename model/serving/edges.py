"""ASGI layers at the edge of the service: what every request passes before it reaches an API.

From the outside in:

``KnownPathsOnly``   any path the service does not serve is a 404 here, before BentoML's request
                     metrics label a series with it (they label by raw path), so series stay bounded.
                     It wraps the app BentoML builds (model/bentoml_internals.py says how).
(BentoML's metrics, tracing, access log, timeout and concurrency limit)
``RetryAfterMiddleware``  every 503 carries Retry-After, BentoML's own included.
``ErrorShapeMiddleware``  every error of an API has the one shape ``{"error", "problems"}``: BentoML's
                     validation errors are rewritten (each problem named by its place in the body),
                     and a client's mistake is logged as one INFO line.
``AuthMiddleware``   who is calling and whether they may (401, 403; 503 when the credentials cannot
                     be read); probes, metrics and docs are open.
``BodyLimitMiddleware``   413 above the body limit, whether or not the length was declared.
``JSONOnlyMiddleware``    415 for a body that is not JSON (BentoML's internal pickle only over the
                     Unix sockets that join the services of one bento).
``OpenAPIDocumentMiddleware``  completes BentoML's OpenAPI document: our error responses, the POST
                     form of the read-only routes, one group for the service's APIs.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from model.serving.auth import Credentials, CredentialsUnavailable, Unauthorised, required_permission, INTERNAL
from model.serving.routes import API_METHODS, PUBLIC_API_PATHS, READ_ONLY_PATHS, is_served
from model.serving.schemas import ERROR_MEANINGS, ErrorBody, Problem, echo

logger = logging.getLogger("ctt")
PICKLE = b"application/vnd.bentoml+pickle"
JSON_MEDIA = b"application/json"


def error_messages(status: int, message: str, problems: list[Problem] | list[dict] = (),
                   headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    """The ASGI messages of an error in the one shape."""
    body = ErrorBody(error=message, problems=list(problems)).model_dump_json().encode()
    start = {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", JSON_MEDIA), (b"content-length", str(len(body)).encode()), *headers]}
    return start, {"type": "http.response.body", "body": body}


async def send_error(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    start, body = error_messages(status, message, headers=headers)
    await send(start)
    await send(body)


def over_unix_socket(scope: dict) -> bool:
    """A connection on a Unix socket: uvicorn gives it no client address and a server address
    without a port (``(path, None)``). BentoML joins the services of one bento through Unix sockets
    in a folder only its user can open, so such a caller is another service of the same pod."""
    server = scope.get("server", ())
    return "client" in scope and scope["client"] is None and (server is None or (
        isinstance(server, (tuple, list)) and len(server) == 2 and server[1] is None))


class KnownPathsOnly:
    """404 for any path the service does not serve, in the error shape, before anything else runs."""

    def __init__(self, app, served: Callable[[str], bool] = is_served):
        self.app = app
        self.served = served

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self.served(scope.get("path", "")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
                return
            return await send_error(send, 404, "no such path; the API is /classify, /tasks, /model, /feedback "
                                               "and /feedback/stats")
        return await self.app(scope, receive, send)


class RetryAfterMiddleware:
    """Every 503 carries Retry-After (BentoML's own, e.g. /readyz while loading or its batching
    dispatcher shedding, included), so clients and proxies back off."""

    def __init__(self, app, retry_after_s: int):
        self.app = app
        self.header = (b"retry-after", str(retry_after_s).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": headers + [self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_retry_after)


def _problems_of(document: Any) -> list[Problem] | None:
    """The problems of a BentoML validation error (``{"error", "detail": [pydantic errors]}``)."""
    if not isinstance(document, dict) or not isinstance(document.get("detail"), list):
        return None
    problems = []
    for error in document["detail"]:
        if not isinstance(error, dict):
            return None
        loc = [part for part in error.get("loc", []) if isinstance(part, (str, int))]
        problems.append(Problem(loc=loc, message=str(error.get("msg", "invalid")).removeprefix("Value error, ")))
    return problems


def _message_of(document: Any, status: int) -> str:
    """One line for an error body BentoML or Starlette wrote in another shape."""
    if isinstance(document, list) and document:  # BentoML wraps some errors in a one-item list
        document = document[0]
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        if status >= 500 and status != 503:
            return "the service failed; its log has the reason"
        return document["error"]
    return {404: "no such path", 405: "method not allowed"}.get(status, ERROR_MEANINGS.get(status, "error"))


class ErrorShapeMiddleware:
    """Errors of the APIs in the one shape; a client's mistake as one INFO line, no traceback; a
    405 lists every method of the path (``methods``), not only those of BentoML's route."""

    def __init__(self, app, methods: dict[str, tuple[str, ...]]):
        self.app = app
        self.paths = frozenset(methods)
        self.methods = methods

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message):
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    return await send(message)
                held = message
                return
            if held is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._send_reshaped(scope, held, b"".join(chunks), send)

        return await self.app(scope, receive, reshaping_send)

    async def _send_reshaped(self, scope, start: dict, body: bytes, send) -> None:
        status = start["status"]
        try:
            document = json.loads(body) if body else None
        except ValueError:
            document = None
        if isinstance(document, dict) and set(document) == {"error", "problems"}:
            reshaped = body  # already ours
        else:
            problems = _problems_of(document)
            if problems is not None:
                message = f"{len(problems)} problem(s) in the request body"
            else:
                message, problems = _message_of(document, status), []
            reshaped = ErrorBody(error=message, problems=problems).model_dump_json().encode()
            document = {"error": message, "problems": [p.model_dump() for p in problems]}
        if 400 <= status < 500 and status not in (401, 403):
            first = (document or {}).get("problems") or []
            summary = (f"{'.'.join(map(str, first[0]['loc'])) or 'body'}: {first[0]['message']}" if first
                       else str((document or {}).get("error", "")))
            logger.info(f"{status} {scope['path']}: {echo(summary) if len(summary) > 200 else summary}")
        replaced = (b"content-length", b"content-type") + ((b"allow",) if status == 405 else ())
        headers = [(name, value) for name, value in start.get("headers", []) if name.lower() not in replaced]
        if status == 405:
            headers.append((b"allow", ", ".join(self.methods[scope["path"]]).encode()))
        await send({**start, "headers": [*headers, (b"content-type", JSON_MEDIA),
                                         (b"content-length", str(len(reshaped)).encode())]})
        await send({"type": "http.response.body", "body": reshaped})


class AuthMiddleware:
    """Bearer / X-API-Key authentication and permissions for every API; the caller's ``Principal``
    is left in ``scope["auth"]`` for the routes."""

    def __init__(self, app, credentials: Credentials, on_unavailable: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.credentials = credentials
        self.on_unavailable = on_unavailable

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        permission = required_permission(scope["path"])
        if permission is None:
            return await self.app(scope, receive, send)
        try:
            principal = INTERNAL if over_unix_socket(scope) else self.credentials.identify(dict(scope["headers"]))
        except Unauthorised as exc:
            return await send_error(send, 401, f"unauthorised: {exc}", [(b"www-authenticate", b'Bearer realm="ctt"')])
        except CredentialsUnavailable as exc:
            self.on_unavailable(str(exc))
            return await send_error(send, 503, "the service cannot read its credentials now; retry later")
        if not principal.may(permission):
            return await send_error(send, 403, f"forbidden: credential {principal.id} lacks the {permission!r} "
                                               "permission")
        scope["auth"] = principal
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, whether or not the client declared a length.

    The body is read here (it is small by construction) and replayed to the application, so a
    chunked upload cannot slip past a Content-Length check."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        await send_error(send, 413, f"request body is larger than the limit of {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class JSONOnlyMiddleware:
    """The API speaks JSON only: any other body is a 415 before anything parses it (form bodies
    would otherwise take a different, laxer validation path). BentoML's internal pickle is accepted
    from the Unix sockets that join the services of one bento, and from nowhere else."""

    def __init__(self, app, paths: frozenset[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            media = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            internal_pickle = media == PICKLE and over_unix_socket(scope)
            if media != JSON_MEDIA and not media.endswith(b"+json") and not internal_pickle:
                return await send_error(send, 415, "send the body as JSON (Content-Type: application/json)")
        return await self.app(scope, receive, send)


# ----- the OpenAPI document -----------------------------------------------------------------
def complete_openapi(document: dict, apis: dict, error_statuses: dict[str, tuple[int, ...]]) -> dict:
    """BentoML's OpenAPI document with what it cannot declare itself: every error our routes
    answer, with its body (``ErrorBody``); the POST form of the read-only routes (BentoML's document
    keeps only the GET of a path that both an API and a mounted route serve); the service's routes
    in one group; no path the service answers 404. ``apis``: BentoML's API methods by name (their
    input and output models are components of the document already); ``error_statuses``: per path,
    the error statuses it answers."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorBody"] = error_schema
    group = next((tag["name"] for tag in document.get("tags", []) if isinstance(tag, dict)), None)
    paths = document.setdefault("paths", {})
    for path in [path for path in paths if not is_served(path)]:
        del paths[path]  # declared for BentoML (the forward pass), answered 404
    for api in apis.values():
        if api.route in READ_ONLY_PATHS and "post" not in paths.get(api.route, {}):
            body, answer = (f"#/components/schemas/{spec.__name__}" for spec in (api.input_spec, api.output_spec))
            paths.setdefault(api.route, {})["post"] = {
                "description": api.doc or "", "operationId": f"post_{api.name}", "x-bentoml-name": api.name,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": body}}}},
                "responses": {"200": {"description": "Successful Response",
                                      "content": {"application/json": {"schema": {"$ref": answer}}}}}}
    for path in error_statuses:
        for method, operation in paths.get(path, {}).items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if "requestBody" in operation:
                operation["requestBody"]["required"] = True  # BentoML reads a missing body as invalid JSON
            responses = operation["responses"]
            for status in error_statuses.get(path, ()):
                responses[str(status)] = {"description": ERROR_MEANINGS[status], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            for status in list(responses):
                if status not in ("200", *(str(s) for s in error_statuses.get(path, ()))):
                    del responses[status]  # BentoML's generic errors, in a shape this service never answers
            if group and path in PUBLIC_API_PATHS:
                operation["tags"] = [group]
    return document


class OpenAPIDocumentMiddleware:
    """Serves BentoML's ``/docs.json`` completed by ``complete_openapi``."""

    def __init__(self, app, complete: Callable[[dict], dict], path: str = "/docs.json"):
        self.app = app
        self.complete = complete
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def collect(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        assert start is not None
        body = b"".join(chunks)
        if start["status"] == 200:
            try:
                body = json.dumps(self.complete(json.loads(body))).encode()
            except Exception:  # BentoML's document as it is beats none
                logger.exception("could not complete the OpenAPI document")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
