"""One typed description of a CTT deployment; every manifest is generated from it.

The three environments differ only in the values below. Nothing else in `deploy/` knows which
environment it is rendering.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.errors import CTTError
from model.settings import BY_NAME, Settings

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")
APP = "ctt"
PORT = 3000
# The image's user. `make image` builds with BENTO_USER_UID=10034 so that the image and the pod's
# securityContext agree and the UID clears the 10000 floor that policy scanners (checkov
# CKV_K8S_40) expect; BentoML's default 1034 would collide with host users on some nodes.
UID = 10034
BENTOML_HOME = "/home/bentoml/.bentoml"
# Everything BentoML and its libraries write at run time; the root filesystem is read-only.
WRITABLE_PATHS = {"bentoml-home": BENTOML_HOME, "tmp": "/tmp", "cache": "/home/bentoml/.cache",
                  # CTT_DATA_DIR: the SQLite feedback file where no DATABASE_URL is set (development)
                  "data": "/var/lib/ctt"}
SECRET_MOUNT = "/var/run/secrets/ctt"
# Connections. uvicorn under BentoML cannot time out a connection that never finishes its headers,
# so the Ingress controller bounds what clients may hold open (ingress-nginx's own ConfigMap: an
# Ingress cannot set these). The pod keeps an idle connection longer than the controller keeps
# one to it: otherwise the controller can reuse a connection the pod has just closed (a 502).
CLIENT_HEADER_TIMEOUT_S = 10
CLIENT_BODY_TIMEOUT_S = 10
CLIENT_KEEPALIVE_S = 30
INGRESS_UPSTREAM_KEEPALIVE_S = 60  # ingress-nginx's default
POD_KEEPALIVE_S = 75
SECRET_KEYS = {"API_KEY": "api-key", "JWT_SECRET": "jwt-secret", "DATABASE_URL": "database-url"}
IMAGE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")
# The Services: the live one behind the Ingress, and the preview one (ClusterIP only) a release checks.
LIVE_SERVICE = APP
PREVIEW_SERVICE = f"{APP}-preview"
# Where the on-call reads what to do about an alert: every alert's runbook_url annotation is this
# page plus the alert's own section (docs/operating.md has one per alert). Point it at your fork or
# internal docs site if that is where the on-call reads the docs, then `make manifests`.
RUNBOOK_URL = "https://github.com/ctt-project/ctt/blob/main/docs/operating.md"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Strict):
    cpu_request: str
    cpu_limit: str
    memory: str  # request and limit: a pod that outgrows its request would be killed anyway
    ephemeral_request: str = "256Mi"
    ephemeral_limit: str = "1Gi"


class Autoscaling(Strict):
    min_replicas: int = Field(ge=1)
    max_replicas: int
    # Of the CPU request: above 100 where the limit is above the request (production's is twice it).
    cpu_utilization: int = Field(70, ge=10, le=400)
    memory_utilization: int = Field(80, ge=10, le=100)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


def _check_overrides(config: dict[str, str]) -> dict[str, str]:
    """An environment's ConfigMap overrides: names and values checked against the settings table."""
    for name, raw in config.items():
        setting = BY_NAME.get(name)
        if setting is None or setting.scope != "runtime" or name == "ENVIRONMENT":
            raise ValueError(f"{name} is not a runtime setting of the service (model/settings.py)")
        try:
            setting.value({name: raw})
        except CTTError as problem:
            raise ValueError(str(problem)) from None
    return config


class Database(Strict):
    """Where the feedback database (PostgreSQL) lives: the NetworkPolicy lets pods reach exactly
    this address range and port. Its URL is the Secret's database-url, mounted as a file."""

    cidr: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")
    port: int = Field(5432, ge=1, le=65535)


class EnvironmentSpec(Strict):
    name: Literal["development", "staging", "production"]
    namespace: str
    replicas: int = Field(ge=1)
    resources: Resources
    autoscaling: Autoscaling | None = None
    # A PodDisruptionBudget with minAvailable=None allows every pod to be evicted (never blocks a drain).
    pdb_min_available: int | None = None
    host: str
    tls_secret: str
    ingress_class: str = "nginx"
    ingress_namespace: str = "ingress-nginx"
    prometheus_namespace: str = "monitoring"
    monitoring_labels: dict[str, str] = {"release": "kube-prometheus-stack"}
    # Egress beyond DNS, as CIDRs with ports; none by default (the database adds its own).
    egress: list[dict] = []
    # The feedback database; None keeps feedback in SQLite in the pod's data volume (development:
    # rows live as long as the pod). Environments that fail closed must name one.
    database: Database | None = None
    # Runtime settings that differ from model/settings.py's defaults, by variable name.
    config: dict[str, str] = {}
    termination_grace_seconds: int = 45

    @field_validator("config")
    @classmethod
    def _known_settings(cls, config: dict[str, str]) -> dict[str, str]:
        return _check_overrides(config)

    def settings(self) -> Settings:
        """What the service will read in this environment."""
        return Settings.from_environ({**self.config, "ENVIRONMENT": self.name})

    @model_validator(mode="after")
    def _consistent(self):
        try:
            self.settings()  # the overrides must agree with each other (e.g. body and item limits)
        except CTTError as problem:
            raise ValueError(f"{self.name}: {problem}") from None
        if self.settings().fails_closed and self.database is None:
            raise ValueError(f"{self.name}: feedback needs a database outside development (set database=)")
        lowest = self.autoscaling.min_replicas if self.autoscaling else self.replicas
        if self.pdb_min_available is not None and self.pdb_min_available >= lowest:
            raise ValueError(f"{self.name}: PDB minAvailable {self.pdb_min_available} would block "
                             f"drains with {lowest} replicas")
        return self


def other(color: Color) -> Color:
    return "green" if color == "blue" else "blue"


def check_image(env: str, image: str) -> str:
    """An image a release may deploy: a well-formed reference, and in production pinned by digest
    (a tag can be moved to other contents after it was tested)."""
    if not IMAGE_PATTERN.fullmatch(image):
        raise CTTError(f"{image!r} is not an image reference (name[:tag][@sha256:<64 hex digits>])")
    if env == "production" and "@sha256:" not in image:
        raise CTTError(f"production takes images by digest only (name@sha256:...), not {image!r}")
    return image


class ColorPlan(Strict):
    """What one release applies for each colour: which colour the live Service selects, the image
    each colour's Deployment runs, and its replicas (None leaves the count to the HPA). It is built
    from what the cluster runs, never read from a file."""

    live: Color
    images: dict[Color, str]
    replicas: dict[Color, int | None]

    @property
    def preview(self) -> Color:
        return other(self.live)

    @field_validator("images")
    @classmethod
    def _valid_images(cls, images: dict) -> dict:
        for color, image in images.items():
            if not IMAGE_PATTERN.fullmatch(image):
                raise ValueError(f"{color}: {image!r} is not an image reference (name[:tag][@sha256:digest])")
        return images


ENVIRONMENTS: dict[str, EnvironmentSpec] = {
    "development": EnvironmentSpec(
        name="development", namespace="ctt-development", replicas=1,
        resources=Resources(cpu_request="250m", cpu_limit="1", memory="512Mi"),
        pdb_min_available=None, host="ctt.development.example.com", tls_secret="ctt-development-tls",
        config={"LOG_LEVEL": "DEBUG", "CTT_DATA_DIR": WRITABLE_PATHS["data"]},
    ),
    "staging": EnvironmentSpec(
        name="staging", namespace="ctt-staging", replicas=2,
        resources=Resources(cpu_request="500m", cpu_limit="1", memory="1Gi"),
        pdb_min_available=1, host="ctt.staging.example.com", tls_secret="ctt-staging-tls",
        # Your PostgreSQL's subnet and port (a managed instance's private range, for example).
        database=Database(cidr="10.20.0.0/24", port=5432),
    ),
    "production": EnvironmentSpec(
        name="production", namespace="ctt-production", replicas=3,
        resources=Resources(cpu_request="1", cpu_limit="2", memory="2Gi", ephemeral_limit="2Gi"),
        # From the measured capacity (benchmarks/results/peers.json, int8, 2 single-threaded workers
        # on 2 CPUs): p99 stays under 200 ms up to 93.5 of the 118 requests/s a pod saturates at,
        # 79 %, so about 1.6 CPU, 160 % of the 1-CPU request. The HPA aims at 120 % (about 60 % of
        # saturation) to leave room for traffic to grow while new pods start and warm up.
        autoscaling=Autoscaling(min_replicas=3, max_replicas=10, cpu_utilization=120),
        pdb_min_available=2, host="ctt.example.com", tls_secret="ctt-production-tls",
        database=Database(cidr="10.30.0.0/24", port=5432),
        config={"CTT_WORKERS": "2"},
    ),
}
