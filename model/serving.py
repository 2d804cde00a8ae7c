"""What the HTTP service needs besides the model and its settings: request and response schemas,
authentication, JSON logs and Prometheus series. ``service.py`` wires these to BentoML."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.errors import CTTError
from model.precision import PRECISIONS
from model.settings import TASK_NAME_MAX_CHARS, SecretSource, Settings, api_keys

logger = logging.getLogger("ctt")

# ----- routes -----------------------------------------------------------------------------
# The service's own routes, declared once: service.py mounts them, the Ingress routes exactly
# PUBLIC_API_PATHS, and a test checks that the served OpenAPI document has no path outside
# these two lists, so a route added later cannot be exposed (or hidden) by accident.
CLASSIFY_PATH = "/classify"
TASKS_PATH = "/tasks"
MODEL_PATH = "/model"
HEALTH_PATH = "/health"
FEEDBACK_PATH = "/feedback"
FEEDBACK_STATS_PATH = "/feedback/stats"
PUBLIC_API_PATHS = (CLASSIFY_PATH, TASKS_PATH, MODEL_PATH, FEEDBACK_PATH, FEEDBACK_STATS_PATH)
JSON_BODY_PATHS = (CLASSIFY_PATH, FEEDBACK_PATH)  # routes that take a body: JSON only (415 otherwise)
# BentoML's probes, metrics and docs: reachable in the cluster only, never through the Ingress.
INTERNAL_PATHS = ("/livez", "/readyz", "/healthz", HEALTH_PATH, "/metrics", "/", "/docs", "/docs.json", "/schema.json")
OPEN_PATHS = frozenset(INTERNAL_PATHS)

# ----- request / response schemas ---------------------------------------------------------
# Items are checked while each request's body is parsed, before any request joins a batch, so one
# client's bad item is that client's 400 and never reaches another client's forward pass.
ECHO_CHARS = 32  # how much of a client's unknown value an error repeats
LISTED_TASKS = 20  # an unknown task's error lists this many known tasks


def echo(value: str) -> str:
    """A client's value as an error message may repeat it: cut short, quoted."""
    return repr(value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…")


# Characters that carry nothing on their own: whitespace, controls, soft hyphen, zero-width and
# bidirectional marks, word joiners, the BOM. A text needs at least one other character. One
# rule, used twice: the service checks texts with it, and the OpenAPI document states it.
VISIBLE_PATTERN = r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u205f-\u206f\ufeff]"
_VISIBLE = re.compile(VISIBLE_PATTERN)
# JSON can spell an unpaired UTF-16 surrogate ("\\ud800"), which is not Unicode text and which
# the tokenizer cannot take.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def text_problem(text: str, max_chars: int) -> str | None:
    """Why ``text`` cannot be classified, or None."""
    if len(text) > max_chars:
        return f"text has {len(text)} characters; the limit is {max_chars}"
    if _SURROGATE.search(text):
        return "text contains an unpaired UTF-16 surrogate (not valid Unicode)"
    if not _VISIBLE.search(text):
        return "text is empty (no visible characters)"
    return None


def item_model(task_names: Sequence[str], max_text_chars: int) -> type[BaseModel]:
    """The item schema with the served model's real constraints, so the OpenAPI document states
    exactly what the service accepts (task names as an enum, the text rule, the length limit)."""
    task_schema: dict[str, Any] = {"maxLength": TASK_NAME_MAX_CHARS}
    if task_names:
        task_schema["enum"] = list(task_names)

    class Item(BaseModel):
        # Strict: `"probabilities": 0` or `"text": 5` is a mistake to report, not to coerce.
        model_config = ConfigDict(extra="forbid", strict=True)

        text: str = Field(description="The text to classify: Unicode text (no unpaired surrogates) with at "
                                      "least one visible character.", examples=["Shares in the bank rose 5%"],
                          json_schema_extra={"pattern": VISIBLE_PATTERN, "minLength": 1, "maxLength": max_text_chars})
        task: str = Field(description="Name of a learned task (see GET /tasks).", examples=list(task_names[:1]),
                          json_schema_extra=task_schema)
        probabilities: bool = Field(False, description="Also return the probability of every label.")

        @field_validator("text")
        @classmethod
        def _text_present_and_bounded(cls, text: str) -> str:
            problem = text_problem(text, max_text_chars)
            if problem:
                raise ValueError(problem)
            return text

        @field_validator("task")
        @classmethod
        def _task_known(cls, task: str) -> str:
            if len(task) > TASK_NAME_MAX_CHARS:
                raise ValueError(f"task names have at most {TASK_NAME_MAX_CHARS} characters")
            if task_names and task not in known:
                listed = ", ".join(task_names[:LISTED_TASKS]) + (
                    f" and {len(task_names) - LISTED_TASKS} more (GET /tasks)" if len(task_names) > LISTED_TASKS else "")
                raise ValueError(f"unknown task {echo(task)}; known tasks: {listed}")
            return task

    known = frozenset(task_names)
    return Item


def classify_request_model(task_names: Sequence[str], max_items: int, max_text_chars: int) -> type[BaseModel]:
    Item = item_model(task_names, max_text_chars)

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        items: list[Item] = Field(min_length=1, max_length=max_items, description=(
            f"1 to {max_items} texts, each with its task; each text at most {max_text_chars} characters."))

    return ClassifyRequest


class Problem(BaseModel):
    """Where a request is wrong: ``loc`` is the path into the body, e.g. ``["items", 2, "task"]``."""

    loc: list[str | int]
    message: str


class ErrorBody(BaseModel):
    """Every error the service answers has this shape."""

    error: str = Field(description="What went wrong, in one line.")
    problems: list[Problem] = Field(default_factory=list, description="Each problem of a rejected body.")


class Prediction(BaseModel):
    task: str
    label: str
    score: float = Field(description="Probability of the predicted label.")
    probabilities: dict[str, float] | None = Field(None, description="Every label's probability, on request.")


# ----- request bodies ---------------------------------------------------------------------
def _json_error(status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = json.dumps({"error": message, "problems": []}).encode()
    start = {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, whether or not the client declared a length.

    The body is read here (it is small by construction) and replayed to the application, so a
    chunked upload cannot slip past a Content-Length check."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        start, body = _json_error(413, f"request body is larger than the limit of {self.max_bytes} bytes")
        await send(start)
        await send(body)

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
    would otherwise take a different, laxer validation path)."""

    def __init__(self, app, paths: frozenset[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            media = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json" and not media.endswith(b"+json"):
                start, body = _json_error(415, "send the body as JSON (Content-Type: application/json)")
                await send(start)
                await send(body)
                return
        return await self.app(scope, receive, send)


# ----- authentication ---------------------------------------------------------------------
class Credentials:
    """API keys and the JWT secret as they are now (files are re-read when they change), and
    the rules a JWT must follow."""

    def __init__(self, settings: Settings, keys: SecretSource, jwt_secret: SecretSource):
        self.settings = settings
        self.keys = keys
        self.jwt_secret = jwt_secret

    def enforced(self, keys: list[str], secret: str | None) -> bool:
        # Outside development and test the API is never open, even if a Secret was emptied.
        return self.settings.fails_closed or bool(keys or secret)

    def open(self) -> bool:
        """True while the API accepts anyone (development or test, no credential configured)."""
        return not self.enforced(api_keys(self.keys), self.jwt_secret.get())

    def check_jwt(self, token: str, secret: str) -> str | None:
        """None when ``token`` is acceptable, else the reason."""
        import jwt

        settings = self.settings
        options = {"require": ["exp"], "verify_aud": settings.jwt_audience is not None}
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options=options,
                                audience=settings.jwt_audience, issuer=settings.jwt_issuer)
        except jwt.ExpiredSignatureError:
            return "token expired"
        except jwt.MissingRequiredClaimError as exc:
            return f"token lacks the {exc.claim!r} claim"
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            return f"token rejected: {exc}"
        except jwt.InvalidTokenError:
            return "invalid credentials"
        issued = claims.get("iat") if isinstance(claims.get("iat"), (int, float)) else time.time()
        if claims["exp"] - issued > settings.jwt_max_lifetime_s:
            return f"token lifetime is above the maximum of {settings.jwt_max_lifetime_s} s"
        return None

    def check(self, headers: dict[bytes, bytes]) -> tuple[bool, str]:
        keys = api_keys(self.keys)
        secret = self.jwt_secret.get()
        if not self.enforced(keys, secret):
            return True, ""
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, bearer = authorization.partition(" ")
        bearer = bearer.strip() if scheme.lower() == "bearer" else ""
        presented = [value for value in (bearer, headers.get(b"x-api-key", b"").decode("latin-1")) if value]
        if not presented:
            return False, "missing credentials: send 'Authorization: Bearer <key or JWT>' or 'X-API-Key: <key>'"
        # Every key is compared (no early exit), in constant time each.
        matches = [hmac.compare_digest(value.encode(), key.encode()) for value in presented for key in keys]
        if any(matches):
            return True, ""
        if secret and bearer.count(".") == 2:
            reason = self.check_jwt(bearer, secret)
            return (True, "") if reason is None else (False, reason)
        return False, "invalid credentials"


class AuthMiddleware:
    """Bearer / X-API-Key authentication for every API; probes, metrics and docs stay open (the
    Ingress does not route them, so they are reachable in the cluster only)."""

    def __init__(self, app, credentials: Credentials):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith("/static"):
            return await self.app(scope, receive, send)
        allowed, reason = self.credentials.check(dict(scope["headers"]))
        if allowed:
            return await self.app(scope, receive, send)
        start, body = _json_error(401, f"unauthorised: {reason}", [(b"www-authenticate", b'Bearer realm="ctt"')])
        await send(start)
        await send(body)


# ----- logs -------------------------------------------------------------------------------
class JSONLogFormatter(logging.Formatter):
    """One JSON object per line; BentoML's trace filter provides the request and trace ids."""

    def __init__(self, environment: str):
        super().__init__()
        self.environment = environment

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "environment": self.environment,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            document["request_id"] = str(request_id)
        trace_msg = getattr(record, "trace_msg", "")
        if trace_msg and "trace=" in trace_msg:
            document["trace_id"] = trace_msg.split("trace=", 1)[1].split(",", 1)[0]
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def configure_json_logging(settings: Settings) -> None:
    """Re-format BentoML's handlers as JSON lines and route our logger through them."""
    level = getattr(logging, settings.log_level, None)
    if not isinstance(level, int):
        raise CTTError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {settings.log_level!r}")
    formatter = JSONLogFormatter(settings.environment)
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for each in loggers:
        for handler in getattr(each, "handlers", []):
            handler.setFormatter(formatter)
    bentoml_logger = logging.getLogger("bentoml")
    if not bentoml_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        bentoml_logger.addHandler(handler)
    logger.handlers = list(bentoml_logger.handlers)
    logger.propagate = False
    logger.setLevel(level)
    bentoml_logger.setLevel(level)


# ----- metrics ----------------------------------------------------------------------------
class Metrics:
    """Our Prometheus series, beside BentoML's own request metrics."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        # Imported here: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker before __init__.
        import prometheus_client as prometheus

        self.predictions = prometheus.Counter(
            "ctt_predictions", "Predictions served, by task.", ["task"])
        self.batch_items = prometheus.Histogram(
            "ctt_forward_batch_items", "Items in one forward pass of the shared backbone.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.forward_seconds = prometheus.Histogram(
            "ctt_forward_seconds", "Seconds per batched forward pass (tokenisation included).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.model_info = prometheus.Gauge(
            "ctt_model_info", "The served model version (value is its task count).",
            ["tag", "environment"], multiprocess_mode="livemax")
        self.served_tasks = prometheus.Gauge(
            "ctt_served_tasks", "Tasks served in each precision (CTT_PRECISION, with fp32 where a task's "
            "version did not measure it within tolerance).", ["precision"], multiprocess_mode="livemax")
        self.shed = prometheus.Counter(
            "ctt_shed_requests", "Requests refused with 503 because the worker's queue was full.")
        self.queued_items = prometheus.Gauge(
            "ctt_queued_items", "Items waiting for a forward pass, summed over workers.", multiprocess_mode="livesum")

    def record_shed(self) -> None:
        if self.enabled:
            self.shed.inc()

    def record_queue(self, items: int) -> None:
        if self.enabled:
            self.queued_items.set(items)

    def record_model(self, tag: str, environment: str, task_count: int, precisions: dict[str, str]) -> None:
        if self.enabled:
            self.model_info.labels(tag=tag, environment=environment).set(task_count)
            for precision in PRECISIONS:
                self.served_tasks.labels(precision=precision).set(list(precisions.values()).count(precision))

    def record_batch(self, tasks: list[str], seconds: float) -> None:
        if not self.enabled:
            return
        self.batch_items.observe(len(tasks))
        self.forward_seconds.observe(seconds)
        for task in set(tasks):
            self.predictions.labels(task=task).inc(tasks.count(task))


# ----- overload and bounded metrics -------------------------------------------------------
class RetryAfterMiddleware:
    """Every 503 carries Retry-After (BentoML's own, e.g. /readyz while loading, included), so
    clients and proxies back off instead of hammering a pod that is loading or shedding."""

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


UNKNOWN_PATH = "/-unknown-"  # the one label every path the service does not serve shares


def bound_request_metric_paths(served_paths: frozenset[str], served_prefixes: tuple[str, ...]) -> None:
    """BentoML labels its request series with the raw path, in a middleware that runs before any
    of ours, so every distinct unknown path (authenticated or not) would add series. Its class is
    looked up when the app is built, so a subclass put in its place sees each request first and
    hands it on with one shared path when the path is not served (it is a 404 either way).
    Tested against a real server (bentoml is pinned)."""
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "bounds_paths", False):
        return

    class BoundedPathMetricsMiddleware(base):
        bounds_paths = True

        async def __call__(self, scope, receive, send):
            path = scope.get("path", "")
            if scope["type"] == "http" and path not in served_paths and not path.startswith(served_prefixes):
                scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedPathMetricsMiddleware
