"""Kubernetes objects for CTT, as plain dicts, built from an EnvironmentSpec.

The shape follows KServe's model-serving Deployment: one container serving HTTP on 3000, probes on
BentoML's /livez and /readyz, metrics scraped from /metrics, and two colours for blue-green.
"""

from __future__ import annotations

from deploy.spec import (APP, BENTOML_HOME, CLIENT_BODY_TIMEOUT_S, CLIENT_HEADER_TIMEOUT_S, CLIENT_KEEPALIVE_S, COLORS,
                         INGRESS_UPSTREAM_KEEPALIVE_S, LIVE_SERVICE, POD_KEEPALIVE_S, PORT, PREVIEW_SERVICE, SECRET_KEYS,
                         SECRET_MOUNT, UID, WRITABLE_PATHS, Color, EnvironmentSpec, other)
from model.serving.routes import PUBLIC_API_PATHS
from model.settings import REQUEST_TIMEOUT_S, RUNTIME_SETTINGS

CONFIG_NAME = f"{APP}-config"
SECRET_NAME = f"{APP}-secrets"


def labels(color: Color | None = None, component: str = "server") -> dict:
    base = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    return {**base, "app.kubernetes.io/color": color} if color else base


def meta(name: str, **extra) -> dict:
    return {"name": name, "labels": labels(), **extra}


def config_env(spec: EnvironmentSpec) -> dict[str, str]:
    """The ConfigMap: every runtime setting of the table, at the environment's value."""
    values = {setting.name: spec.config.get(setting.name, setting.default)
              for setting in RUNTIME_SETTINGS if setting.default is not None or setting.name in spec.config}
    return {**values, "ENVIRONMENT": spec.name, "BENTOML_HOME": BENTOML_HOME,
            "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "true"}


def namespace(spec: EnvironmentSpec) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": spec.namespace, "labels": {
            **labels(), "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
            "pod-security.kubernetes.io/warn": "restricted", "pod-security.kubernetes.io/audit": "restricted"}}}


def service_account() -> dict:
    # No Role or RoleBinding: the service never talks to the Kubernetes API.
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(APP),
            "automountServiceAccountToken": False}


def _probe(path: str, period: int, failures: int, timeout: int = 3) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def secret_volume(optional: bool) -> dict:
    return {"name": "secrets", "secret": {"secretName": SECRET_NAME, "optional": optional, "defaultMode": 0o440}}


def deployment(color: Color) -> dict:
    """A colour's environment-neutral Deployment; each overlay patches image, size and replicas."""
    pod_labels = labels(color)
    container = {
        "name": APP,
        "image": f"{APP}-image-{color}",
        "imagePullPolicy": "Always",
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # Flags for the image's `bentoml serve` (it takes them when the first starts with '-').
        "args": ["--timeout-keep-alive", str(POD_KEEPALIVE_S)],
        "envFrom": [{"configMapRef": {"name": CONFIG_NAME}}],
        # Secrets arrive as files, never as environment variables: env values leak into
        # `kubectl describe`, crash dumps and child processes; files can be rotated in place.
        "env": [{"name": f"{key}_FILE", "value": f"{SECRET_MOUNT}/{filename}"}
                for key, filename in SECRET_KEYS.items()],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi", "ephemeral-storage": "256Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi", "ephemeral-storage": "1Gi"}},
        # The model loads and warms up in the background: the startup probe gives it time,
        # liveness only checks the process, readiness waits for the warm model.
        "startupProbe": _probe("/livez", period=2, failures=60),
        "livenessProbe": _probe("/livez", period=10, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        # Give endpoints time to drop this pod before BentoML starts its graceful shutdown.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": name, "mountPath": path} for name, path in WRITABLE_PATHS.items()]
        + [{"name": "secrets", "mountPath": SECRET_MOUNT, "readOnly": True}],
    }
    pod = {
        "serviceAccountName": APP,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 45,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        # The model is baked into the image; BentoML's working files are per pod, so any number of
        # replicas on any nodes need no shared volume.
        "volumes": [{"name": name, "emptyDir": {"sizeLimit": "512Mi"}} for name in WRITABLE_PATHS]
        # Required: a pod of an environment that fails closed must not start without its Secret
        # (development's overlay makes it optional).
        + [secret_volume(optional=False)],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": pod_labels}}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": pod_labels}}}]}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{APP}-{color}", "labels": pod_labels},
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": pod_labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": pod_labels, "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
                "spec": pod},
        },
    }


def deployment_patch(color: Color, spec: EnvironmentSpec, image: str, replicas: int | None) -> dict:
    """What an environment and a release change in a colour's Deployment (a strategic-merge patch).
    ``replicas`` None leaves the count out: an HPA owns it, and the Deployment must not fight it."""
    r = spec.resources
    container = {"name": APP, "image": image, "resources": {
        "requests": {"cpu": r.cpu_request, "memory": r.memory, "ephemeral-storage": r.ephemeral_request},
        "limits": {"cpu": r.cpu_limit, "memory": r.memory, "ephemeral-storage": r.ephemeral_limit}}}
    pod: dict = {"terminationGracePeriodSeconds": spec.termination_grace_seconds, "containers": [container]}
    if not spec.settings().fails_closed:
        pod["volumes"] = [secret_volume(optional=True)]
    body: dict = {"template": {"spec": pod}, "replicas": replicas}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{APP}-{color}"}, "spec": body}


def service(name: str, color: Color, role: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {**labels(), "ctt.dev/role": role}},
            "spec": {"type": "ClusterIP", "selector": labels(color),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def services(live: Color) -> list[dict]:
    """The live Service (behind the Ingress) selects ``live``; the preview Service the other colour."""
    return [service(LIVE_SERVICE, live, "active"), service(PREVIEW_SERVICE, other(live), "preview")]


def pdb(color: Color, spec: EnvironmentSpec | None = None) -> dict:
    budget = ({"minAvailable": spec.pdb_min_available} if spec and spec.pdb_min_available is not None
              else {"maxUnavailable": "100%"})
    # AlwaysAllow: pods that are not Ready protect nothing, so a colour whose pods all fail
    # readiness must not block a node drain.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": f"{APP}-{color}", "labels": labels(color)},
            "spec": {**budget, "selector": {"matchLabels": labels(color)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def hpa(color: Color, spec: EnvironmentSpec) -> dict:
    scaling = spec.autoscaling
    metrics = [{"type": "Resource", "resource": {"name": name, "target": {
        "type": "Utilization", "averageUtilization": value}}}
        for name, value in (("cpu", scaling.cpu_utilization), ("memory", scaling.memory_utilization))]
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": f"{APP}-{color}", "labels": labels(color)},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{APP}-{color}"},
                     "minReplicas": scaling.min_replicas, "maxReplicas": scaling.max_replicas,
                     "metrics": metrics,
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}


def ingress(spec: EnvironmentSpec) -> dict:
    """Only the public API, path by path: probes, /metrics, /health and the docs stay in-cluster."""
    backend = {"service": {"name": APP, "port": {"name": "http"}}}
    paths = [{"path": path, "pathType": "Exact", "backend": backend} for path in PUBLIC_API_PATHS]
    body_limit = spec.settings().max_body_bytes
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": meta(APP, annotations={
                "nginx.ingress.kubernetes.io/ssl-redirect": "true",
                "nginx.ingress.kubernetes.io/proxy-body-size": str(body_limit),
                # A pod answers within the request timeout (then 504); the controller waits a little longer.
                "nginx.ingress.kubernetes.io/proxy-connect-timeout": "5",
                "nginx.ingress.kubernetes.io/proxy-send-timeout": str(REQUEST_TIMEOUT_S + 5),
                "nginx.ingress.kubernetes.io/proxy-read-timeout": str(REQUEST_TIMEOUT_S + 5)}),
            "spec": {"ingressClassName": spec.ingress_class,
                     "tls": [{"hosts": [spec.host], "secretName": spec.tls_secret}],
                     "rules": [{"host": spec.host, "http": {"paths": paths}}]}}


def ingress_controller_settings(spec: EnvironmentSpec) -> dict:
    """What the ingress-nginx controller must bound for every client, which an Ingress cannot set:
    header and body read timeouts (a client that never finishes its request is cut off there, not
    left holding a connection to a pod) and keep-alive, below the pods' own."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ingress-nginx-controller", "namespace": spec.ingress_namespace},
            "data": {"client-header-timeout": str(CLIENT_HEADER_TIMEOUT_S),
                     "client-body-timeout": str(CLIENT_BODY_TIMEOUT_S),
                     "keep-alive": str(CLIENT_KEEPALIVE_S),
                     "upstream-keepalive-timeout": str(INGRESS_UPSTREAM_KEEPALIVE_S)}}


def network_policy(spec: EnvironmentSpec | None = None) -> dict:
    ingress_ns = spec.ingress_namespace if spec else "ingress-nginx"
    prometheus_ns = spec.prometheus_namespace if spec else "monitoring"
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    extra = [{"to": [{"ipBlock": {"cidr": rule["cidr"]}}],
              "ports": [{"protocol": "TCP", "port": rule["port"]}]} for rule in (spec.egress if spec else [])]
    if spec and spec.database:  # the feedback database: its address range and port, nothing more
        extra.append({"to": [{"ipBlock": {"cidr": spec.database.cidr}}],
                      "ports": [{"protocol": "TCP", "port": spec.database.port}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(APP),
            "spec": {"podSelector": {"matchLabels": labels()}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}],
                                  "ports": [{"protocol": "TCP", "port": PORT}]}
                                 for ns in (ingress_ns, prometheus_ns)],
                     "egress": [dns, *extra]}}


def service_monitor(spec: EnvironmentSpec | None = None) -> dict:
    extra = spec.monitoring_labels if spec else {"release": "kube-prometheus-stack"}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": APP, "labels": {**labels(), **extra}},
            "spec": {"selector": {"matchLabels": labels()},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]}}


# One key per client, each with only the permissions it needs (model/serving/auth.py).
EXAMPLE_API_KEYS = ("<web-frontend-secret> id=web-frontend permissions=classify\n"
                    "<corrections-secret> id=corrections permissions=classify,feedback\n"
                    "<reviewers-secret> id=reviewers permissions=classify,feedback,review\n")


def secret_example(spec: EnvironmentSpec) -> dict:
    values = {filename: f"<{key} for {spec.name}>" for key, filename in SECRET_KEYS.items()}
    values[SECRET_KEYS["API_KEY"]] = EXAMPLE_API_KEYS
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": SECRET_NAME, "namespace": spec.namespace, "labels": labels()},
            "stringData": values}


def create_secret_command(spec: EnvironmentSpec) -> str:
    sources = " ".join(f"--from-file={filename}=./api-keys" if key == "API_KEY"
                       else f"--from-literal={filename}=\"${key}\"" for key, filename in SECRET_KEYS.items())
    return f"kubectl -n {spec.namespace} create secret generic {SECRET_NAME} {sources}"


def base_objects() -> list[dict]:
    """The colour-neutral objects every environment shares; colours are a release's to apply."""
    return [service_account(), *(pdb(c) for c in COLORS), network_policy(), service_monitor()]
