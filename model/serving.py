"""What the HTTP service needs besides the model and its settings: request and response schemas,
authentication, JSON logs and Prometheus series. ``service.py`` wires these to BentoML."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.errors import CTTError
from model.settings import Settings

logger = logging.getLogger("ctt")

# ----- request / response schemas ---------------------------------------------------------
# Tasks are checked while the request body is parsed, i.e. per request and before BentoML merges
# requests into a batch, so one client's bad item can never fail another client's request.
_known_tasks: dict[str, list[str]] = {}
_limits = {"max_text_chars": 10000}


def set_known_tasks(tasks: dict[str, list[str]], max_text_chars: int) -> None:
    _known_tasks.clear()
    _known_tasks.update(tasks)
    _limits["max_text_chars"] = max_text_chars


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The text to classify.", examples=["Shares in the bank rose 5%"])
    task: str = Field(description="Name of a learned task (see GET /tasks).", examples=["bbc-topic"])
    probabilities: bool = Field(False, description="Also return the probability of every label.")

    @field_validator("text")
    @classmethod
    def _text_present_and_bounded(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty")
        if len(text) > _limits["max_text_chars"]:
            raise ValueError(f"text has {len(text)} characters; the limit is {_limits['max_text_chars']}")
        return text

    @field_validator("task")
    @classmethod
    def _task_known(cls, task: str) -> str:
        if _known_tasks and task not in _known_tasks:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(_known_tasks)}")
        return task


class Prediction(BaseModel):
    task: str
    label: str
    score: float = Field(description="Probability of the predicted label.")
    probabilities: dict[str, float] | None = Field(None, description="Every label's probability, on request.")


def items_field(max_items: int):
    return Annotated[list[Item], Field(min_length=1, max_length=max_items,
                                       description=f"1 to {max_items} texts, each with its task.")]


# ----- authentication ---------------------------------------------------------------------
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/metrics",
                        "/", "/docs", "/docs.json", "/schema.json"})


class AuthMiddleware:
    """Bearer / X-API-Key authentication for every API; probes, metrics and docs stay open."""

    def __init__(self, app, api_key: str | None = None, jwt_secret: str | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.jwt_secret = jwt_secret

    def _authorised(self, headers: dict[bytes, bytes]) -> tuple[bool, str]:
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, bearer = authorization.partition(" ")
        bearer = bearer.strip() if scheme.lower() == "bearer" else ""
        presented = [value for value in (bearer, headers.get(b"x-api-key", b"").decode("latin-1")) if value]
        if not presented:
            return False, "missing credentials: send 'Authorization: Bearer <key or JWT>' or 'X-API-Key: <key>'"
        if self.api_key and any(hmac.compare_digest(value.encode(), self.api_key) for value in presented):
            return True, ""
        if self.jwt_secret and bearer:
            import jwt

            try:
                jwt.decode(bearer, self.jwt_secret, algorithms=["HS256"], options={"require": ["exp"]})
                return True, ""
            except jwt.ExpiredSignatureError:
                return False, "token expired"
            except jwt.InvalidTokenError:
                pass
        return False, "invalid credentials"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith("/static"):
            return await self.app(scope, receive, send)
        allowed, reason = self._authorised(dict(scope["headers"]))
        if allowed:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": f"unauthorised: {reason}"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="ctt"')]})
        await send({"type": "http.response.body", "body": body})


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

    def record_model(self, tag: str, environment: str, task_count: int) -> None:
        if self.enabled:
            self.model_info.labels(tag=tag, environment=environment).set(task_count)

    def record_batch(self, tasks: list[str], seconds: float) -> None:
        if not self.enabled:
            return
        self.batch_items.observe(len(tasks))
        self.forward_seconds.observe(seconds)
        for task in set(tasks):
            self.predictions.labels(task=task).inc(tasks.count(task))
