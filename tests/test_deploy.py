"""Deployment manifests, proven with the tools platform teams use (no cluster exists here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.render import RULES_FILE, RULES_TEST_FILE, overlay_dir, release_objects, render
from deploy.spec import COLORS, ENVIRONMENTS, SECRET_KEYS, UID, WRITABLE_PATHS, ColorPlan
from model.serving.routes import INTERNAL_PATHS, PUBLIC_API_PATHS
from model.settings import RUNTIME_SETTINGS, SECRET_SETTINGS, Settings
from tests.serving import PROJECT

DIGEST = "ghcr.io/example/ctt@sha256:" + "ab" * 32
KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32"]
CRD_SCHEMAS = {kind: json.loads((PROJECT / "deploy" / "schemas" / f"{kind.lower()}.v1.json").read_text())
               for kind in ("ServiceMonitor", "PrometheusRule")}
TOOLS = PROJECT / ".venv-tools" / "bin"


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{TOOLS}:{Path(sys.executable).parent}:/usr/bin:/usr/local/bin")
    if not found:
        pytest.fail(f"{name} is not installed: run `make tools` (the Makefile installs it before tests)")
    return found


def full_size(env: str, live: str = "blue") -> ColorPlan:
    """Both colours running one image at the environment's size: what a release applies."""
    spec = ENVIRONMENTS[env]
    return ColorPlan(live=live, images={c: DIGEST for c in COLORS},
                     replicas={c: None if spec.autoscaling else spec.replicas for c in COLORS})


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy")
    for env in ENVIRONMENTS:
        render(env, out, full_size(env))
    return out


def kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered(layout) -> dict[str, list[dict]]:
    return {env: kustomize(overlay_dir(layout, env)) for env in ENVIRONMENTS}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(rendered, env, version):
    for obj in rendered[env]:
        if obj["kind"] in CRD_SCHEMAS:
            # Structural CRD schemas are OpenAPI v3 (draft-4 like). The schema itself is not
            # meta-validated: it carries Go regular expressions that Python's `re` rejects.
            schema = {**CRD_SCHEMAS[obj["kind"]], "required": ["apiVersion", "kind", "metadata", "spec"]}
            jsonschema.Draft4Validator(schema).validate(obj)
            continue
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_checkov_finds_nothing(layout, env, tmp_path):
    (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(kustomize(overlay_dir(layout, env))))
    result = subprocess.run([tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                             "-o", "json", "--quiet", "--compact"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == [], failed
    assert report["summary"]["passed"] > 100 and report["summary"]["parsing_errors"] == 0


def test_skips_carry_reasons(rendered):
    for objects in rendered.values():
        for obj in objects:
            for key, value in (obj["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    assert re.match(r"^CKV2?_K8S_\d+=.{10,}", value), value


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_alert_rules_check_and_unit_tests(layout, env):
    folder = overlay_dir(layout, env)
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(folder / RULES_FILE)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", RULES_TEST_FILE], cwd=folder, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {rule["alert"] for rule in yaml.safe_load((folder / RULES_FILE).read_text())["groups"][0]["rules"]}
    tests = yaml.safe_load((folder / RULES_TEST_FILE).read_text())["tests"]
    for alert in alerts:
        outcomes = {bool(t["alert_rule_test"][0]["exp_alerts"]) for t in tests if t["alert_rule_test"][0]["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert} needs a firing and a silent test"


def test_alerts_use_metrics_the_service_exports(rendered):
    rule = by_kind(rendered["production"], "PrometheusRule")[0]
    expressions = " ".join(r["expr"] for r in rule["spec"]["groups"][0]["rules"])
    for metric in re.findall(r"(bentoml_service_\w+|ctt_\w+)", expressions):
        assert metric.startswith(("bentoml_service_request_total", "bentoml_service_request_duration_seconds", "ctt_")), metric
    # The series are defined in model/serving/metrics.py and, for feedback, model/serving/feedback.py.
    serving = "".join((PROJECT / "model" / path).read_text() for path in ("serving/metrics.py", "serving/feedback.py"))
    board = next(c for c in by_kind(rendered["production"], "ConfigMap") if c["metadata"]["name"] == "ctt-dashboard")
    dashboard = json.loads(board["data"]["ctt-dashboard.json"])
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ctt_(\w+?)(?:_total|_bucket|_sum|_count)?[{\[]", target["expr"]):
                assert f'"ctt_{name}"' in serving, name


def test_sizes_replicas_and_autoscaling(rendered):
    expectations = {"development": (1, "512Mi", None), "staging": (2, "1Gi", None), "production": (None, "2Gi", 3)}
    for env, (replicas, memory, hpa_min) in expectations.items():
        deployments = by_kind(rendered[env], "Deployment")
        assert len(deployments) == 2
        for deployment in deployments:
            assert deployment["spec"].get("replicas") == replicas, env
            resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
            assert resources["requests"]["memory"] == memory and resources["limits"]["memory"] == memory
            assert {"cpu", "ephemeral-storage"} <= set(resources["requests"]) & set(resources["limits"])
        hpas = by_kind(rendered[env], "HorizontalPodAutoscaler")
        if hpa_min is None:
            assert hpas == []
            continue
        assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {d["metadata"]["name"] for d in deployments}
        for hpa in hpas:
            assert hpa["spec"]["minReplicas"] == hpa_min
            assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}


def test_disruption_budgets_never_block_drains(rendered):
    for env, objects in rendered.items():
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"] for h in by_kind(objects, "HorizontalPodAutoscaler")}
        deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
        for budget in by_kind(objects, "PodDisruptionBudget"):
            name = budget["metadata"]["name"]
            lowest = hpas.get(name) or deployments[name]["spec"]["replicas"]
            if "minAvailable" in budget["spec"]:
                assert budget["spec"]["minAvailable"] < lowest, (env, name)
            else:
                assert budget["spec"]["maxUnavailable"] == "100%"
            assert budget["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
            # Pods that are not Ready protect nothing: they must not block a drain either.
            assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", (env, name)


def test_restricted_pod_security_and_writable_paths(rendered):
    for objects in rendered.values():
        namespace = by_kind(objects, "Namespace")[0]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for deployment in by_kind(objects, "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            container = pod["containers"][0]
            context = container["securityContext"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"] and context["seccompProfile"]["type"] == "RuntimeDefault"
            assert pod["automountServiceAccountToken"] is False
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert set(WRITABLE_PATHS.values()) <= mounts
            empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            assert empty_dirs == set(WRITABLE_PATHS)
            assert "@sha256:" in container["image"] and container["imagePullPolicy"] == "Always"


def test_labels_and_selectors_agree(rendered):
    for objects in rendered.values():
        deployments = by_kind(objects, "Deployment")
        for deployment in deployments:
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
        matching = lambda svc: [d for d in deployments  # noqa: E731
                                if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching(services["ctt"])) == 1 and len(matching(services["ctt-preview"])) == 1
        assert matching(services["ctt"]) != matching(services["ctt-preview"])
        ingress = by_kind(objects, "Ingress")[0]
        assert ingress["spec"]["tls"] and ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "ctt"
        monitor = by_kind(objects, "ServiceMonitor")[0]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= services["ctt"]["metadata"]["labels"].items()
        policy = by_kind(objects, "NetworkPolicy")[0]
        assert all(policy["spec"]["podSelector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments)
        sources = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                   for rule in policy["spec"]["ingress"] for peer in rule["from"]}
        assert sources == {"ingress-nginx", "monitoring"}
        assert [p["port"] for p in policy["spec"]["egress"][0]["ports"]] == [53, 53]


def test_no_secret_values_anywhere(layout, rendered):
    for objects in rendered.values():
        assert by_kind(objects, "Secret") == [], "Secrets are created out of band, never rendered"
        for config in by_kind(objects, "ConfigMap"):
            for key in config.get("data", {}):
                assert not re.search(r"(^|_)(API_?KEY|SECRET|TOKEN|PASSWORD)(_|$)", key, re.I), key
    for example in layout.glob("overlays/*/secret.example.yaml"):
        document = yaml.safe_load(example.read_text())
        for value in document["stringData"].values():
            assert all(line.startswith("<") and ">" in line for line in value.splitlines()), value
        assert "kubectl" in example.read_text() and "create secret" in example.read_text()


def test_the_secret_example_gives_each_client_its_own_key_and_permissions(layout):
    from model.serving.auth import parse_api_keys

    document = yaml.safe_load((layout / "overlays" / "production" / "secret.example.yaml").read_text())
    keys = parse_api_keys(document["stringData"][SECRET_KEYS["API_KEY"]])
    assert [key.id for key in keys] == ["web-frontend", "corrections", "reviewers"]
    assert [sorted(key.permissions) for key in keys] == [["classify"], ["classify", "feedback"],
                                                          ["classify", "feedback", "review"]]


def test_connections_are_bounded_at_the_ingress_and_outlived_by_the_pods(layout, rendered):
    """uvicorn cannot time out a client that never finishes its headers: the controller does. The
    pod keeps idle connections longer than the controller reuses them, so it never closes one the
    controller is about to send on (a 502)."""
    from model.settings import REQUEST_TIMEOUT_S

    for env, objects in rendered.items():
        (ingress,) = by_kind(objects, "Ingress")
        annotations = ingress["metadata"]["annotations"]
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > REQUEST_TIMEOUT_S
        controller = yaml.safe_load(
            "\n".join(line for line in (layout / "overlays" / env / "ingress-controller.example.yaml").read_text()
                      .splitlines() if not line.startswith("#")))["data"]
        assert int(controller["client-header-timeout"]) <= 10 and int(controller["client-body-timeout"]) <= 10
        for deployment in by_kind(objects, "Deployment"):
            args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[0] == "--timeout-keep-alive" and int(args[1]) > int(controller["upstream-keepalive-timeout"])


def test_every_setting_the_service_reads_is_set(rendered):
    """The ConfigMap carries every runtime setting of the table at a value the service accepts,
    and every secret arrives as a mounted file."""
    for env, objects in rendered.items():
        config = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].startswith("ctt-config"))
        assert {s.name for s in RUNTIME_SETTINGS if s.default is not None} <= set(config["data"])
        assert Settings.from_environ(config["data"]).environment == env
        for deployment in by_kind(objects, "Deployment"):
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
            env_vars = {e["name"]: e["value"] for e in container["env"]}
            for setting in SECRET_SETTINGS:
                assert env_vars[f"{setting.name}_FILE"].endswith(SECRET_KEYS[setting.name])


def test_spec_overrides_are_checked_against_the_settings_table():
    spec = ENVIRONMENTS["staging"]
    with pytest.raises(ValueError, match="CTT_MAX_ITMES is not a runtime setting"):
        spec.model_validate({**spec.model_dump(), "config": {"CTT_MAX_ITMES": "8"}})
    with pytest.raises(ValueError, match="must be a whole number"):
        spec.model_validate({**spec.model_dump(), "config": {"CTT_MAX_ITEMS": "many"}})
    with pytest.raises(ValueError, match="CTT_MAX_BODY_BYTES=2048 is below"):
        spec.model_validate({**spec.model_dump(), "config": {"CTT_MAX_BODY_BYTES": "2048"}})


def test_secret_is_required_where_the_service_fails_closed(rendered):
    for env, objects in rendered.items():
        for deployment in by_kind(objects, "Deployment"):
            volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
            assert volume["secret"]["optional"] is (env == "development"), env


def test_ingress_routes_only_the_public_api(rendered):
    for env, objects in rendered.items():
        (ingress,) = by_kind(objects, "Ingress")
        paths = ingress["spec"]["rules"][0]["http"]["paths"]
        assert [(p["path"], p["pathType"]) for p in paths] == [(path, "Exact") for path in PUBLIC_API_PATHS]
        assert not {p["path"] for p in paths} & set(INTERNAL_PATHS)
        limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert int(limit) == ENVIRONMENTS[env].settings().max_body_bytes


def test_probes_and_graceful_termination(rendered):
    for deployment in by_kind(rendered["production"], "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/livez"
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5
        assert container["lifecycle"]["preStop"]


def test_a_bootstrap_leaves_the_idle_colour_at_zero_and_the_live_service_on_the_empty_colour():
    objects = release_objects("staging", ColorPlan(live="green", images={c: DIGEST for c in COLORS},
                                                   replicas={"blue": 2, "green": 0}))
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in by_kind(objects, "Deployment")}
    assert replicas == {"ctt-blue": 2, "ctt-green": 0}
    selectors = {s["metadata"]["name"]: s["spec"]["selector"]["app.kubernetes.io/color"] for s in by_kind(objects, "Service")}
    assert selectors == {"ctt": "green", "ctt-preview": "blue"}
    assert all(s["spec"]["type"] == "ClusterIP" for s in by_kind(objects, "Service"))
    assert all(o["metadata"].get("namespace") == "ctt-staging" for o in objects if o["kind"] != "Namespace")


def test_render_requires_a_known_environment(capsys):
    from training.cli import main

    assert main(["deploy", "render", "--env", "qa"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.count("\n") == 1


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_committed_manifests_match_the_generator(tmp_path):
    """deploy/base and deploy/overlays are generated: they must not drift from deploy/spec.py."""
    for env in ENVIRONMENTS:
        render(env, tmp_path)
    for folder in ["base", *(f"overlays/{env}" for env in ENVIRONMENTS)]:
        assert snapshot(tmp_path / folder) == snapshot(PROJECT / "deploy" / folder), f"re-run make manifests ({folder})"


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_applying_a_committed_overlay_cannot_touch_traffic(env):
    """The colours live in the cluster: a committed overlay carries no image, no Deployment and no
    Service, so `kubectl apply -k` of it can neither deploy a placeholder nor switch a colour."""
    objects = kustomize(PROJECT / "deploy" / "overlays" / env)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Deployment", "Service", "HorizontalPodAutoscaler"}, kinds
    text = "\n".join(p.read_text() for p in (PROJECT / "deploy").rglob("*.yaml") if "schemas" not in p.parts)
    assert "registry.example.com" not in text and "0" * 64 not in text and "image:" not in text
    assert not list((PROJECT / "deploy").rglob("release.json"))


def test_render_writes_under_the_working_directory(tmp_path, monkeypatch):
    from training.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "render", "--env", "staging"]) == 0
    assert (tmp_path / "deploy" / "overlays" / "staging" / "kustomization.yaml").is_file()


def test_ci_workflow_is_valid():
    workflow = PROJECT / ".github" / "workflows" / "ci-cd.yml"
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    document = yaml.safe_load(workflow.read_text())
    jobs = document["jobs"]
    assert list(jobs) == ["test", "build", "staging", "production"]
    for job in jobs.values():
        for step in job["steps"]:
            if "uses" in step:  # third-party code runs with the pipeline's secrets: pinned by commit
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    for env in ("staging", "production"):
        script = "\n".join(step.get("run", "") for step in jobs[env]["steps"])
        assert f"ctt deploy release --env {env}" in script and "release.json" not in script
        # One release at a time per environment, never cancelled half way.
        assert jobs[env]["concurrency"] == {"group": f"release-{env}", "cancel-in-progress": False}
