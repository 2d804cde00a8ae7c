"""Every setting the service reads from its environment, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import CTTError

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise CTTError(f"{name} must be true or false, got {raw!r}")


def env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise CTTError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise CTTError(f"{name} must be at least {minimum}, got {value}")
    return value


def secret(name: str) -> str | None:
    """A secret from NAME, or from the file NAME_FILE names (how the Kubernetes manifests pass
    secrets: mounted files, never environment values)."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CTTError(f"{name}_FILE={path}: cannot read ({exc.strerror})") from None


@dataclass(frozen=True)
class Settings:
    """Every environment variable the service reads (the deployment sets each of them)."""

    environment: str = field(default_factory=lambda: os.environ.get("ENVIRONMENT", "development"))
    log_level: str = field(default_factory=lambda: os.environ.get("LOG_LEVEL", "INFO").upper())
    monitoring_enabled: bool = field(default_factory=lambda: env_bool("MONITORING_ENABLED", True))
    model_tag: str | None = field(default_factory=lambda: os.environ.get("CTT_MODEL_TAG") or None)
    max_batch_size: int = field(default_factory=lambda: env_int("CTT_MAX_BATCH_SIZE", 32, minimum=2))
    max_latency_ms: int = field(default_factory=lambda: env_int("CTT_MAX_LATENCY_MS", 1000))
    max_items: int = field(default_factory=lambda: env_int("CTT_MAX_ITEMS", 64))
    max_text_chars: int = field(default_factory=lambda: env_int("CTT_MAX_TEXT_CHARS", 10000))
    workers: int = field(default_factory=lambda: env_int("CTT_WORKERS", 1))
    torch_threads: int = field(default_factory=lambda: env_int("CTT_TORCH_THREADS", 1))
    api_key: str | None = field(default_factory=lambda: secret("API_KEY"), repr=False)
    jwt_secret: str | None = field(default_factory=lambda: secret("JWT_SECRET"), repr=False)


# What a deployment must set (model/ctt.py reads MAX_TASKS); the model version itself is fixed
# when the bento is built (CTT_MODEL_TAG / CTT_MODEL_NAME are build-time only).
RUNTIME_ENV_VARS = ("ENVIRONMENT", "LOG_LEVEL", "MONITORING_ENABLED", "MAX_TASKS", "CTT_MAX_BATCH_SIZE",
                    "CTT_MAX_LATENCY_MS", "CTT_MAX_ITEMS", "CTT_MAX_TEXT_CHARS", "CTT_WORKERS", "CTT_TORCH_THREADS")
SECRET_ENV_VARS = ("API_KEY", "JWT_SECRET")
