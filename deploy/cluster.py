"""The only part of a release that talks to Kubernetes: one small interface, and its kubectl
implementation. The release logic (deploy/release.py) sees nothing else, so it is tested against a
stateful stand-in (tests/standin_cluster.py) where no Kubernetes API server can run.

Everything a release decides is read from here: the live colour is the live Service's selector,
each colour's image is its Deployment's, and the release record (last known good releases and the
lock) is a ConfigMap written with compare-and-swap on its resourceVersion.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import httpx
import yaml

from deploy.local import free_port
from deploy.spec import APP, COLORS, Color
from model.errors import CTTError

RECORD_NAME = f"{APP}-release"
RECORD_KEY = "record.json"
COLOR_LABEL = "app.kubernetes.io/color"


class ClusterError(CTTError):
    """The cluster refused or could not be reached; the message says which call and why."""


class RecordConflict(ClusterError):
    """Someone else wrote the release record since it was read."""


@dataclass(frozen=True)
class ColorState:
    image: str | None  # None: the colour has no Deployment
    replicas: int
    ready: int


class Cluster(Protocol):
    namespace: str

    def live_color(self) -> Color | None: ...
    def colors(self) -> dict[Color, ColorState]: ...
    def apply(self, objects: list[dict]) -> None: ...
    def scale(self, color: Color, replicas: int) -> None: ...
    def wait_for_rollout(self, color: Color, timeout: float) -> None: ...
    def point_service(self, service: str, color: Color) -> None: ...
    def port_forward(self, service: str): ...  # a context manager yielding a base URL
    def read_record(self) -> tuple[dict, str | None]: ...
    def write_record(self, record: dict, version: str | None) -> None: ...


def record_configmap(namespace: str, record: dict, version: str | None) -> dict:
    metadata = {"name": RECORD_NAME, "namespace": namespace, "labels": {"app.kubernetes.io/name": APP}}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {RECORD_KEY: json.dumps(record, indent=2, sort_keys=True)}}


class Kubectl:
    """The interface over `kubectl`, in one namespace (and optionally one kubeconfig context)."""

    def __init__(self, namespace: str, context: str | None = None):
        self.namespace = namespace
        self.kubectl = shutil.which("kubectl")
        if not self.kubectl:
            raise CTTError("kubectl is not on PATH")
        self.prefix = [self.kubectl, *(["--context", context] if context else []), "--namespace", namespace]

    def _run(self, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*self.prefix, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"kubectl {' '.join(args[:2])} did not answer within {timeout:.0f} s") from None

    def _ok(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        result = self._run(*args, stdin=stdin, timeout=timeout)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ClusterError(f"kubectl {' '.join(args[:2])} failed: {last}")
        return result.stdout

    def _get(self, kind: str, name: str) -> dict | None:
        result = self._run("get", kind, name, "--output", "json")
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise ClusterError(f"kubectl get {kind} {name} failed: {result.stderr.strip()[-300:]}")
        return json.loads(result.stdout)

    def live_color(self) -> Color | None:
        service = self._get("service", APP)
        return service["spec"]["selector"].get(COLOR_LABEL) if service else None

    def colors(self) -> dict[Color, ColorState]:
        states = {}
        for color in COLORS:
            deployment = self._get("deployment", f"{APP}-{color}")
            if deployment is None:
                states[color] = ColorState(None, 0, 0)
                continue
            states[color] = ColorState(deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                                       deployment["spec"].get("replicas", 1),
                                       deployment.get("status", {}).get("readyReplicas", 0))
        return states

    def apply(self, objects: list[dict]) -> None:
        self._ok("apply", "--filename", "-", stdin=yaml.safe_dump_all(objects, sort_keys=False))

    def scale(self, color: Color, replicas: int) -> None:
        self._ok("scale", f"deployment/{APP}-{color}", f"--replicas={replicas}")

    def wait_for_rollout(self, color: Color, timeout: float) -> None:
        self._ok("rollout", "status", f"deployment/{APP}-{color}", f"--timeout={int(timeout)}s", timeout=timeout + 30)

    def point_service(self, service: str, color: Color) -> None:
        self._ok("patch", "service", service, "--type", "merge",
                 "--patch", json.dumps({"spec": {"selector": {COLOR_LABEL: color}}}))

    @contextmanager
    def port_forward(self, service: str) -> Iterator[str]:
        """`kubectl port-forward` to a ClusterIP Service; yields a loopback URL."""
        port = free_port()
        process = subprocess.Popen([*self.prefix, "port-forward", f"service/{service}", f"{port}:80"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    raise ClusterError(f"kubectl port-forward service/{service} failed: "
                                       f"{(process.stderr.read().strip().splitlines() or ['exited'])[-1]}")
                try:
                    httpx.get(f"{url}/livez", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"kubectl port-forward service/{service}: no answer within 30 s") from None
                    time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)

    def read_record(self) -> tuple[dict, str | None]:
        configmap = self._get("configmap", RECORD_NAME)
        if configmap is None:
            return {}, None
        return json.loads(configmap.get("data", {}).get(RECORD_KEY, "{}")), configmap["metadata"]["resourceVersion"]

    def write_record(self, record: dict, version: str | None) -> None:
        # create fails if it exists, replace fails if resourceVersion moved on: compare-and-swap either way.
        verb = "create" if version is None else "replace"
        result = self._run(verb, "--filename", "-", stdin=json.dumps(record_configmap(self.namespace, record, version)))
        if result.returncode != 0:
            if "AlreadyExists" in result.stderr or "Conflict" in result.stderr or "has been modified" in result.stderr:
                raise RecordConflict("the release record changed while this command ran")
            raise ClusterError(f"kubectl {verb} configmap/{RECORD_NAME} failed: {result.stderr.strip()[-300:]}")
