"""JSON-lines logs, and client mistakes kept out of the error log.

Every line is one JSON object (BentoML's trace filter provides request and trace ids). BentoML logs
every exception an API raised at ERROR with a traceback, a client's invalid body and a shed request
included; those are a client's mistake or deliberate shedding, already answered (4xx, 503) and
logged as one INFO line by ``model/serving/edges.py``, so ``QuietClientErrors`` drops BentoML's
copy. A user's text never reaches a log line: messages name items by their place in the body.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from model.errors import CTTError
from model.settings import Settings

logger = logging.getLogger("ctt")


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




class OncePer:
    """Calls ``log(message)`` at most once every ``seconds``: a fault every request meets (keys that
    cannot be read) is one line a minute, not one per request."""

    def __init__(self, seconds: float, log, clock=time.monotonic):
        self.seconds = seconds
        self.log = log
        self.clock = clock
        self._last = -float("inf")

    def __call__(self, message: str) -> None:
        now = self.clock()
        if now - self._last >= self.seconds:
            self._last = now
            self.log(message)


def client_error_or_shedding(exc: BaseException | None) -> bool:
    """A pydantic validation error (a client's body), or one of BentoML's exceptions that is a 4xx
    or a 503 (its batching dispatcher shedding)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    if isinstance(exc, BentoMLException):
        status = int(exc.error_code)
        return status < 500 or status == 503
    return False


class QuietClientErrors(logging.Filter):
    """Drops BentoML's ERROR record of a client's mistake or of shedding on one of ``paths`` (see
    the module docstring); records about other services' routes in the same process are kept."""

    def __init__(self, paths: frozenset[str]):
        super().__init__()
        self.paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (path in self.paths and record.exc_info and client_error_or_shedding(record.exc_info[1]))


def quiet_client_errors(logger_name: str, paths: frozenset[str]) -> None:
    """Install ``QuietClientErrors`` for ``paths`` on the logger BentoML reports API exceptions with."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(existing, QuietClientErrors) and existing.paths == paths for existing in target.filters):
        target.addFilter(QuietClientErrors(paths))
