"""One typed description of a CTT deployment; every manifest is generated from it.

The three environments differ only in the values below. Nothing else in `deploy/` knows which
environment it is rendering.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
WRITABLE_PATHS = {"bentoml-home": BENTOML_HOME, "tmp": "/tmp", "cache": "/home/bentoml/.cache"}
SECRET_MOUNT = "/var/run/secrets/ctt"
SECRET_KEYS = {"API_KEY": "api-key", "JWT_SECRET": "jwt-secret", "DATABASE_URL": "database-url"}
IMAGE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")


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
    cpu_utilization: int = Field(70, ge=10, le=100)
    memory_utilization: int = Field(80, ge=10, le=100)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class ServiceConfig(Strict):
    """The ConfigMap: every runtime setting the service reads (model/serving.py Settings)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    monitoring_enabled: bool = True
    max_tasks: int = 50
    max_batch_size: int = 32
    max_latency_ms: int = 1000
    max_items: int = 64
    max_text_chars: int = 10000
    workers: int = 1
    torch_threads: int = 1


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
    # Egress beyond DNS, as CIDRs with ports (e.g. a database); none by default.
    egress: list[dict] = []
    config: ServiceConfig = ServiceConfig()
    termination_grace_seconds: int = 45

    @model_validator(mode="after")
    def _consistent(self):
        lowest = self.autoscaling.min_replicas if self.autoscaling else self.replicas
        if self.pdb_min_available is not None and self.pdb_min_available >= lowest:
            raise ValueError(f"{self.name}: PDB minAvailable {self.pdb_min_available} would block "
                             f"drains with {lowest} replicas")
        return self


class Release(Strict):
    """Blue-green state of one environment: which colour serves, and what each colour runs."""

    active: Color = "blue"
    images: dict[Color, str] = {"blue": "registry.example.com/ctt@sha256:" + "0" * 64,
                                "green": "registry.example.com/ctt@sha256:" + "0" * 64}

    @property
    def preview(self) -> Color:
        return "green" if self.active == "blue" else "blue"

    @field_validator("images")
    @classmethod
    def _valid_images(cls, images: dict) -> dict:
        for color, image in images.items():
            if not IMAGE_PATTERN.match(image):
                raise ValueError(f"{color}: {image!r} is not an image reference (name[:tag][@sha256:digest])")
        return images


ENVIRONMENTS: dict[str, EnvironmentSpec] = {
    "development": EnvironmentSpec(
        name="development", namespace="ctt-development", replicas=1,
        resources=Resources(cpu_request="250m", cpu_limit="1", memory="512Mi"),
        pdb_min_available=None, host="ctt.development.example.com", tls_secret="ctt-development-tls",
        config=ServiceConfig(log_level="DEBUG"),
    ),
    "staging": EnvironmentSpec(
        name="staging", namespace="ctt-staging", replicas=2,
        resources=Resources(cpu_request="500m", cpu_limit="1", memory="1Gi"),
        pdb_min_available=1, host="ctt.staging.example.com", tls_secret="ctt-staging-tls",
    ),
    "production": EnvironmentSpec(
        name="production", namespace="ctt-production", replicas=3,
        resources=Resources(cpu_request="1", cpu_limit="2", memory="2Gi", ephemeral_limit="2Gi"),
        autoscaling=Autoscaling(min_replicas=3, max_replicas=10),
        pdb_min_available=2, host="ctt.example.com", tls_secret="ctt-production-tls",
        config=ServiceConfig(workers=2),
    ),
}
