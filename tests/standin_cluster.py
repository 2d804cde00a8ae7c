"""A stateful stand-in for the cluster interface (deploy/cluster.py): it keeps the objects applied
to it and answers every read from them, the way the API server would for the calls a release
makes. No Kubernetes API server can run on these machines, so the release logic is tested here.

What it models, because a release depends on it:
- `apply` creates or replaces objects by kind and name; a Deployment applied without `replicas`
  keeps its count (1 when new), as `kubectl apply` does;
- an HPA raises its target to minReplicas, but does nothing while the target is at zero;
- a colour's pods become ready only for images it can "pull" (``image_urls``): each such image is
  a real `bentoml serve` process, and a port-forward to a Service returns the URL of the process
  that the selected colour's image stands for;
- the release record is a ConfigMap written with compare-and-swap on its resourceVersion;
- ``fail_after(call, times)`` makes the cluster unreachable after that many successful calls of
  one kind, until ``reachable()``: a run that dies half way.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from deploy.cluster import COLOR_LABEL, ClusterError, ColorState, RecordConflict
from deploy.spec import APP, COLORS


class StandInCluster:
    def __init__(self, namespace: str, image_urls: dict[str, str]):
        self.namespace = namespace
        self.image_urls = image_urls
        self.objects: dict[tuple[str, str], dict] = {}
        self.record: dict | None = None
        self.record_version = 0
        self.calls: list[str] = []
        self._down = False
        self._fail_after: tuple[str, int] | None = None

    # ----- failure injection -----
    def fail_after(self, call: str, times: int = 1) -> None:
        self._fail_after = (call, times)

    def reachable(self) -> None:
        self._down, self._fail_after = False, None

    def _call(self, name: str) -> None:
        if self._down:
            raise ClusterError(f"kubectl {name}: Unable to connect to the server (stand-in unreachable)")
        self.calls.append(name)

    def _called(self, name: str) -> None:
        if self._fail_after and self._fail_after[0] == name:
            remaining = self._fail_after[1] - 1
            self._fail_after = (name, remaining)
            if remaining <= 0:
                self._down = True

    # ----- reads -----
    def _deployment(self, color: str) -> dict | None:
        return self.objects.get(("Deployment", f"{APP}-{color}"))

    def _ready(self, deployment: dict) -> int:
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        return deployment["spec"]["replicas"] if image in self.image_urls else 0

    def live_color(self):
        self._call("get service")
        service = self.objects.get(("Service", APP))
        return service["spec"]["selector"][COLOR_LABEL] if service else None

    def colors(self):
        self._call("get deployments")
        states = {}
        for color in COLORS:
            deployment = self._deployment(color)
            states[color] = (ColorState(None, 0, 0) if deployment is None else ColorState(
                deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                deployment["spec"]["replicas"], self._ready(deployment)))
        return states

    # ----- writes -----
    def apply(self, objects: list[dict]) -> None:
        self._call("apply")
        for obj in objects:
            if obj["kind"] not in ("Namespace",):
                assert obj["metadata"].get("namespace") == self.namespace, obj["metadata"]
            key = (obj["kind"], obj["metadata"]["name"])
            new = copy.deepcopy(obj)
            if obj["kind"] == "Deployment" and "replicas" not in obj["spec"]:
                current = self.objects.get(key)
                new["spec"]["replicas"] = current["spec"]["replicas"] if current else 1
            self.objects[key] = new
        self._autoscale()
        self._called("apply")

    def _autoscale(self) -> None:
        for (kind, _), hpa in self.objects.items():
            if kind != "HorizontalPodAutoscaler":
                continue
            target = self.objects.get(("Deployment", hpa["spec"]["scaleTargetRef"]["name"]))
            if target and target["spec"]["replicas"] > 0:  # at zero the HPA does nothing
                target["spec"]["replicas"] = min(max(target["spec"]["replicas"], hpa["spec"]["minReplicas"]),
                                                 hpa["spec"]["maxReplicas"])

    def scale(self, color, replicas: int) -> None:
        self._call("scale")
        deployment = self._deployment(color)
        if deployment is None:
            raise ClusterError(f'deployments.apps "{APP}-{color}" not found')
        deployment["spec"]["replicas"] = replicas
        self._autoscale()
        self._called("scale")

    def wait_for_rollout(self, color, timeout: float) -> None:
        self._call("rollout status")
        deployment = self._deployment(color)
        if deployment is None:
            raise ClusterError(f'deployments.apps "{APP}-{color}" not found')
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        if deployment["spec"]["replicas"] > 0 and image not in self.image_urls:
            raise ClusterError(f"rollout of {APP}-{color} timed out: ImagePullBackOff for {image}")
        self._called("rollout status")

    def point_service(self, service: str, color) -> None:
        self._call("patch service")
        self.objects[("Service", service)]["spec"]["selector"][COLOR_LABEL] = color
        self._called("patch service")

    @contextmanager
    def port_forward(self, service: str):
        self._call("port-forward")
        color = self.objects[("Service", service)]["spec"]["selector"][COLOR_LABEL]
        deployment = self._deployment(color)
        if deployment is None or self._ready(deployment) < 1:
            raise ClusterError(f"port-forward service/{service}: no ready pod of {color}")
        url = self.image_urls[deployment["spec"]["template"]["spec"]["containers"][0]["image"]]
        self._called("port-forward")
        yield url

    def read_record(self):
        self._call("get configmap")
        if self.record is None:
            return {}, None
        return copy.deepcopy(self.record), str(self.record_version)

    def write_record(self, record: dict, version) -> None:
        self._call("write configmap")
        current = None if self.record is None else str(self.record_version)
        if version != current:
            raise RecordConflict("the release record changed while this command ran")
        self.record, self.record_version = copy.deepcopy(record), self.record_version + 1
        self._called("write configmap")

    # ----- what the tests look at -----
    def image_of(self, color) -> str | None:
        deployment = self._deployment(color)
        return deployment["spec"]["template"]["spec"]["containers"][0]["image"] if deployment else None

    def replicas_of(self, color) -> int | None:
        deployment = self._deployment(color)
        return deployment["spec"]["replicas"] if deployment else None

    def live(self):
        return self.objects[("Service", APP)]["spec"]["selector"][COLOR_LABEL]
