"""Every setting CTT reads from its environment, defined once.

``SETTINGS`` is the table: name, default, meaning, whether it is a secret, and where it applies.
Everything else is derived from it: ``Settings`` (what the service and the CLI read),
the configuration table of docs/operating.md (``python -m model.settings``), the Kubernetes ConfigMap
(``deploy/manifests.py``) and the Ingress body limit; ``bentofile.yaml`` is checked against it by
a test. Nothing below ``model/`` reads the environment on its own: values are passed in.

Secrets are never kept in ``Settings``: a ``SecretSource`` re-reads its mounted file when it
changes, so a key rotated in a Kubernetes Secret takes effect without a restart.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from model.errors import CTTError
from model.precision import FAST_PATH_Z, MAX_ACCURACY_LOSS, PRECISIONS
from model.tags import check_model_name

ENVIRONMENTS = ("development", "test", "staging", "production")
# Outside these, the service refuses to start without credentials (it fails closed).
OPEN_ENVIRONMENTS = ("development", "test")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
MIN_JWT_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key must be at least as long as the hash
TASK_NAME_MAX_CHARS = 64  # model/ctt.py TASK_NAME_PATTERN allows 1-64 characters
REQUEST_TIMEOUT_S = 30  # BentoML's traffic.timeout: a request still running after this is a 504


# ----- parsers: each raises ValueError with the reason ------------------------------------
def _boolean(raw: str) -> bool:
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise ValueError("must be true or false")


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value

    parse.__doc__ = f"whole number ≥ {minimum}" + (f", ≤ {maximum}" if maximum is not None else "")
    return parse


def _seconds(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        if not minimum <= value <= maximum:  # NaN fails both
            raise ValueError(f"must be between {minimum:g} and {maximum:g} seconds")
        return value

    return parse


def _choice(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _text(raw: str) -> str:
    return raw


def _optional_text(raw: str) -> str | None:
    return raw or None


@dataclass(frozen=True)
class Setting:
    """One environment variable. ``scope``: ``runtime`` (the deployment's ConfigMap sets it),
    ``build`` (fixed when the bento is built), ``secret`` (a mounted file, ``NAME_FILE``)."""

    name: str
    field: str
    default: str | None
    meaning: str
    parse: Callable[[str], Any] = _text
    scope: str = "runtime"

    @property
    def secret(self) -> bool:
        return self.scope == "secret"

    def value(self, environ: Mapping[str, str]) -> Any:
        raw = environ.get(self.name)
        if raw is None or raw == "":
            raw = self.default
        if raw is None:
            return None
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise CTTError(f"{self.name}={raw!r}: {exc}") from None


SETTINGS: tuple[Setting, ...] = (
    Setting("ENVIRONMENT", "environment", "development",
            "development, test, staging or production; outside development and test the service "
            "refuses to start without credentials", _choice(*ENVIRONMENTS)),
    Setting("LOG_LEVEL", "log_level", "INFO", "JSON-lines log level: DEBUG, INFO, WARNING or ERROR",
            _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)),
    Setting("MONITORING_ENABLED", "monitoring_enabled", "true", "`false` turns off the `/metrics` series",
            _boolean),
    Setting("MAX_TASKS", "max_tasks", "50", "most tasks one model may hold (learning and serving)",
            _whole(1, 100_000)),
    Setting("CTT_MAX_LABELS", "max_labels", "256",
            "most labels one task may have: every task's head is padded to the widest, so this "
            "bounds the memory of every batch", _whole(2, 10_000)),
    Setting("CTT_MAX_BATCH_SIZE", "max_batch_size", "32", "most items in one batched forward pass",
            _whole(2, 4096)),
    Setting("CTT_MAX_WAIT_S", "max_wait_s", "5",
            "a request is refused at once (503 with Retry-After) when the wait its worker predicts for it (the items "
            "the worker holds times the measured seconds per item) is above this many seconds; 5 s admits a burst of "
            "256 single texts on an idle 2-worker pod (about 1.3 s of work at 98 texts/s per MiniLM worker in int8: "
            "`benchmarks/peers.py`) and keeps admitted requests well inside the 30 s request timeout "
            "(`benchmarks/overload.py` measures it)", _seconds(0.01, 25)),
    Setting("CTT_RETRY_AFTER_S", "retry_after_s", "1", "Retry-After of every 503", _whole(1, 3600)),
    Setting("CTT_SHUTDOWN_DRAIN_S", "shutdown_drain_s", "20",
            "after SIGTERM, keep answering (each answer closing its connection) until the API has been quiet "
            "for 1 s since SIGTERM and no connection waits to be accepted, at most this long (keep it "
            "below the pod's termination grace period minus its preStop sleep)", _whole(0, 600)),
    Setting("CTT_LOAD_ATTEMPTS", "load_attempts", "5",
            "model load attempts (backoff 1, 2, 4 … s) before liveness fails and the pod restarts",
            _whole(1, 100)),
    Setting("CTT_MAX_ITEMS", "max_items", "64", "most items in one request", _whole(1, 4096)),
    Setting("CTT_MAX_TEXT_CHARS", "max_text_chars", "10000", "most characters in one item's text",
            _whole(1, 1_000_000)),
    Setting("CTT_MAX_BODY_BYTES", "max_body_bytes", "1048576",
            "largest request body (413 above it); the Ingress allows the same", _whole(1024)),
    Setting("CTT_WORKERS", "workers", "1", "worker processes (one per CPU of the pod's limit)", _whole(1, 64)),
    Setting("CTT_MAX_CONCURRENCY", "max_concurrency", "1024",
            "most requests one worker handles at once (BentoML's `traffic.max_concurrency` is this times "
            "`CTT_WORKERS`), a bound on the bodies held in memory; beyond it BentoML answers 429 at once. Each "
            "/classify holds two (itself and its forward pass): far more than CTT_MAX_WAIT_S admits on MiniLM",
            _whole(8, 100_000)),
    Setting("CTT_TORCH_THREADS", "torch_threads", "1", "torch threads per worker", _whole(1, 64)),
    Setting("CTT_PRECISION", "precision", "int8",
            "`int8` (dynamically quantised backbone, each row scaled first; about 1.3× the forward rate) or `fp32` "
            "(the reference); a task is served in int8 unless its version measured int8 worse (a sign test on the "
            f"evaluation examples fp32 and int8 classify differently, z > {FAST_PATH_Z:g}; versions before it: "
            f"within {100 * MAX_ACCURACY_LOSS:g} point), otherwise in fp32 (`/model` lists each task's)",
            _choice(*PRECISIONS)),
    Setting("JWT_AUDIENCE", "jwt_audience", None, "when set, JWTs must carry this `aud`", _optional_text),
    Setting("JWT_ISSUER", "jwt_issuer", None, "when set, JWTs must carry this `iss`", _optional_text),
    Setting("JWT_MAX_LIFETIME_S", "jwt_max_lifetime_s", "3600",
            "JWTs need `exp`; a lifetime (`exp` − `iat`, or `exp` − now) above this is refused",
            _whole(1, 31 * 86400)),
    Setting("CTT_CREDENTIALS_RELOAD_S", "credentials_reload_s", "10",
            "how often mounted secret files are checked for changes", _whole(1, 60)),
    Setting("CTT_DATA_DIR", "data_dir", None,
            "folder of the default feedback database (SQLite, `feedback.sqlite3`) when no `DATABASE_URL` "
            "is set; default `ctt-data` in the BentoML home", _optional_text),
    Setting("CTT_DB_TIMEOUT_S", "database_timeout_s", "5",
            "feedback database connect, statement and pool timeout; a database down for longer makes "
            "`/feedback` a 503 with Retry-After (`/classify` is never affected)", _whole(1, 300)),
    Setting("CTT_FEEDBACK_RETENTION_DAYS", "feedback_retention_days", "90",
            "`ctt feedback prune` deletes feedback older than this by default (rows hold users' text)",
            _whole(1, 36500)),
    Setting("CTT_MODEL_NAME", "model_name", "ctt", "model name in the BentoML store", check_model_name,
            scope="build"),
    Setting("CTT_MODEL_TAG", "model_tag", None,
            "version to serve (default: newest); `bentoml build` pins it into the bento", _optional_text,
            scope="build"),
    Setting("API_KEY", "api_key", None,
            "API keys, one per line: `SECRET id=NAME permissions=classify,feedback,review` (`API_KEY_FILE` names a "
            "file; it is re-read when it changes); a key without `permissions=` may classify and send corrections",
            scope="secret"),
    Setting("JWT_SECRET", "jwt_secret", None,
            f"HS256 secret for JWTs, at least {MIN_JWT_SECRET_BYTES} bytes (or `JWT_SECRET_FILE`)",
            scope="secret"),
    Setting("DATABASE_URL", "database_url", None,
            "feedback database, `postgresql+psycopg://user:password@host:5432/db` (or `DATABASE_URL_FILE`); "
            "unset: SQLite under `CTT_DATA_DIR`; staging and production refuse to start without it",
            scope="secret"),
)
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
RUNTIME_SETTINGS = tuple(s for s in SETTINGS if s.scope == "runtime")
SECRET_SETTINGS = tuple(s for s in SETTINGS if s.secret)


def default(name: str) -> Any:
    """A setting's parsed default (e.g. for a model built without any environment)."""
    return BY_NAME[name].value({})


def setting_value(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting's value from the environment (for tools that need one, not all of them)."""
    return BY_NAME[name].value(os.environ if environ is None else environ)


@dataclass(frozen=True)
class Settings:
    """The values of every non-secret setting (see ``SETTINGS`` for names, defaults, meaning)."""

    environment: str
    log_level: str
    monitoring_enabled: bool
    max_tasks: int
    max_labels: int
    max_batch_size: int
    max_wait_s: float
    retry_after_s: int
    shutdown_drain_s: int
    load_attempts: int
    max_items: int
    max_text_chars: int
    max_body_bytes: int
    workers: int
    max_concurrency: int
    torch_threads: int
    precision: str
    jwt_audience: str | None
    jwt_issuer: str | None
    jwt_max_lifetime_s: int
    credentials_reload_s: int
    data_dir: str | None
    database_timeout_s: int
    feedback_retention_days: int
    model_name: str
    model_tag: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {s.field: s.value(environ) for s in SETTINGS if not s.secret}
        settings = cls(**values)
        settings.check_consistent()
        return settings

    @property
    def fails_closed(self) -> bool:
        return self.environment not in OPEN_ENVIRONMENTS

    def check_consistent(self) -> None:
        # Any request within the item and character limits must fit the body limit when its
        # text is ASCII; otherwise the limits would contradict each other at the Ingress.
        needed = self.max_items * (self.max_text_chars + 200)
        if self.max_body_bytes < needed:
            raise CTTError(f"CTT_MAX_BODY_BYTES={self.max_body_bytes} is below CTT_MAX_ITEMS × "
                           f"(CTT_MAX_TEXT_CHARS + 200) = {needed}: raise it or lower the item limits")


def settings_markdown() -> str:
    """The configuration table of docs/operating.md."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        name = f"`{s.name}`" + (f" / `{s.name}_FILE`" if s.secret else "")
        shown = "unset" if s.default is None else f"`{s.default}`"
        scope = {"build": " (build time)", "secret": " (secret)"}.get(s.scope, "")
        rows.append(f"| {name} | {shown} | {s.meaning}{scope} |")
    return "\n".join(rows) + "\n"


# ----- secrets ----------------------------------------------------------------------------
class SecretSource:
    """A secret from ``NAME`` or from the file ``NAME_FILE`` names (how the manifests pass
    secrets: mounted files, never environment values). The file is checked for changes at most
    every ``reload_s`` seconds; Kubernetes replaces mounted Secret files in place."""

    def __init__(self, name: str, environ: Mapping[str, str] | None = None, reload_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        environ = os.environ if environ is None else environ
        self.name = name
        self.inline = environ.get(name) or None
        self.path = Path(environ[f"{name}_FILE"]) if environ.get(f"{name}_FILE") else None
        self.reload_s = reload_s
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._signature: tuple | None = None
        self._value: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.inline or self.path)

    def _read_file(self) -> str | None:
        assert self.path is not None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._signature = None
            return None
        except OSError as exc:
            raise CTTError(f"{self.name}_FILE={self.path}: cannot read ({exc.strerror})") from None
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return self._value
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CTTError(f"{self.name}_FILE={self.path}: cannot read ({exc})") from None
        self._signature = signature
        return text or None

    def get(self) -> str | None:
        if self.inline:
            return self.inline
        if self.path is None:
            return None
        with self._lock:
            now = self.clock()
            if now - self._checked_at >= self.reload_s:
                self._value = self._read_file()
                self._checked_at = now
            return self._value


def check_jwt_secret(secret: str | None) -> None:
    if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise CTTError(f"JWT_SECRET has {len(secret.encode())} bytes; HS256 needs at least "
                       f"{MIN_JWT_SECRET_BYTES} (e.g. `openssl rand -hex 32`)")


if __name__ == "__main__":
    print(settings_markdown(), end="")


__all__ = ["SETTINGS", "Settings", "Setting", "SecretSource", "default", "settings_markdown", "check_jwt_secret"]
