"""Releases, checks and rollbacks against two real `bentoml serve` processes standing in for the
two colours' pods, behind a stateful stand-in of the cluster (tests/standin_cluster.py): no
Kubernetes API server can run here."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from deploy.release import ReleaseFailed, ReleaseOptions, release, rollback, unlock
from deploy.spec import ENVIRONMENTS
from model.errors import CTTError
from tests.conftest import MONEY, QUESTION, SPORT, STATEMENT, write_jsonl
from tests.serving import PROJECT, bentoml_serve, free_port
from tests.standin_cluster import StandInCluster
from training.learn import LearnSettings, learn

API_KEY = "test-key-" + uuid.uuid4().hex
IMAGE_A = "ghcr.io/example/ctt@sha256:" + "a1" * 32
IMAGE_B = "ghcr.io/example/ctt@sha256:" + "b2" * 32
UNPULLABLE = "ghcr.io/example/ctt@sha256:" + "dd" * 32
NAMESPACE = ENVIRONMENTS["production"].namespace


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Two model versions, each served by its own process: what images A and B would run."""
    name = f"ctt-release-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    folder = tmp_path_factory.mktemp("release-data")
    settings = LearnSettings(backbone="micro", epochs=1, progress=False)
    try:
        tag_a = learn("topic", write_jsonl(folder / "t.jsonl", [(t, "sport") for t in SPORT]
                                           + [(t, "money") for t in MONEY]), settings=settings).tag
        tag_b = learn("question", write_jsonl(folder / "q.jsonl", [(t, "question") for t in QUESTION]
                                              + [(t, "statement") for t in STATEMENT]), settings=settings).tag
        env = {"CTT_MODEL_NAME": name, "API_KEY": API_KEY, "ENVIRONMENT": "test"}
        with ExitStack() as stack_a, ExitStack() as stack_b, ThreadPoolExecutor(2) as pool:
            # Both servers start at once: start-up is mostly waiting for the model to load.
            url_a, url_b = pool.map(lambda pair: pair[0].enter_context(bentoml_serve(env={**env, "CTT_MODEL_TAG": pair[1]})),
                                    [(stack_a, tag_a), (stack_b, tag_b)])
            yield {"a": (IMAGE_A, tag_a, url_a), "b": (IMAGE_B, tag_b, url_b)}
    finally:
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous


@pytest.fixture
def cluster(colours):
    return StandInCluster(NAMESPACE, {image: url for image, _, url in colours.values()})


def options(**overrides) -> ReleaseOptions:
    values = dict(api_key=API_KEY, bake_seconds=1.0, bake_interval=0.3, live_timeout=10, rollout_timeout=5,
                  request_timeout=30, max_latency_ms=5000, holder="test-run")
    return ReleaseOptions(**{**values, **overrides})


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def known(cluster) -> list[tuple[str, str]]:
    return [(k["image"], k["model_tag"]) for k in cluster.record.get("known_good", [])]


def test_first_release_bootstraps_one_colour_and_leaves_the_other_at_zero(colours, cluster):
    image, tag, _ = colours["a"]
    message = release(cluster, "production", image, tag, options(), Log())
    assert "is live on blue" in message
    assert cluster.live() == "blue" and cluster.image_of("blue") == image
    # No placeholder anywhere: the idle colour holds the same tested image, scaled to zero, and its
    # HPA leaves it there; the live colour runs the HPA's minimum.
    assert cluster.image_of("green") == image and cluster.replicas_of("green") == 0
    assert cluster.replicas_of("blue") == ENVIRONMENTS["production"].autoscaling.min_replicas
    assert known(cluster) == [(image, tag)] and cluster.record["lock"] is None


def test_second_release_goes_to_the_idle_colour_and_a_rerun_is_a_no_op(colours, cluster):
    (image_a, tag_a, _), (image_b, tag_b, _) = colours["a"], colours["b"]
    release(cluster, "production", image_a, tag_a, options(), Log())
    log = Log()
    assert "is live on green" in release(cluster, "production", image_b, tag_b, options(), log)
    assert any("preview (green) checks" in line for line in log) and any("live (green) checks" in line for line in log)
    assert cluster.live() == "green" and cluster.image_of("green") == image_b
    assert cluster.image_of("blue") == image_a and cluster.replicas_of("blue") == 3  # kept warm
    assert cluster.replicas_of("green") == 3  # scaled up from zero explicitly: the HPA would not
    assert known(cluster) == [(image_b, tag_b), (image_a, tag_a)]
    applies = cluster.calls.count("apply")
    assert "nothing to do" in release(cluster, "production", image_b, tag_b, options(), Log())
    assert cluster.calls.count("apply") == applies and cluster.live() == "green"


def test_failed_preview_check_never_switches(colours, cluster):
    (image_a, tag_a, _), (_, tag_b, _) = colours["a"], colours["b"]
    release(cluster, "production", image_a, tag_a, options(), Log())
    # An image that serves version A, released as if it served B: the preview's /model says otherwise.
    cluster.image_urls["ghcr.io/example/ctt@sha256:" + "c3" * 32] = colours["a"][2]
    cluster.calls.clear()
    with pytest.raises(ReleaseFailed, match=f"model tag: /model reports {tag_a}, expected {tag_b}.*not switched"):
        release(cluster, "production", "ghcr.io/example/ctt@sha256:" + "c3" * 32, tag_b, options(), Log())
    assert "patch service" not in cluster.calls and cluster.live() == "blue"
    with pytest.raises(CTTError, match="ImagePullBackOff"):
        release(cluster, "production", UNPULLABLE, tag_b, options(), Log())
    assert cluster.live() == "blue" and known(cluster) == [(image_a, tag_a)] and cluster.record["lock"] is None


def test_failed_live_check_switches_back_with_one_line(colours, cluster, monkeypatch, capsys):
    from training.cli import main

    (image_a, tag_a, _), (image_b, tag_b, _) = colours["a"], colours["b"]
    release(cluster, "production", image_a, tag_a, options(), Log())
    monkeypatch.setattr("deploy.cli.connect", lambda env, context: cluster)
    code = main(["deploy", "release", "--env", "production", "--image", image_b, "--model-tag", tag_b,
                 "--api-key", API_KEY, "--bake-seconds", "1", "--max-latency-ms", "0.001"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert error.startswith("ctt: error: bake: average latency") and "switched back to blue" in error
    assert cluster.live() == "blue" and known(cluster) == [(image_a, tag_a)]


def test_rerun_after_a_failure_half_way(colours, cluster):
    (image_a, tag_a, _), (image_b, tag_b, _) = colours["a"], colours["b"]
    release(cluster, "production", image_a, tag_a, options(), Log())
    cluster.fail_after("patch service")  # the switch lands, then the cluster is gone
    with pytest.raises(ReleaseFailed, match="switching back to blue failed too"):
        release(cluster, "production", image_b, tag_b, options(live_timeout=1), Log())
    cluster.reachable()
    assert cluster.live() == "green" and cluster.record["lock"]["holder"] == "test-run"  # the mess left behind
    with pytest.raises(CTTError, match="being released by test-run.*ctt deploy unlock"):
        release(cluster, "production", image_b, tag_b, options(holder="next-run"), Log())
    assert unlock(cluster) == "test-run"
    log = Log()
    assert "is live on green" in release(cluster, "production", image_b, tag_b, options(holder="next-run"), log)
    assert any("which no release completed: switched back to blue" in line for line in log)
    assert known(cluster) == [(image_b, tag_b), (image_a, tag_a)] and cluster.record["lock"] is None


def test_rollback_twice_in_a_row_never_returns_to_the_rolled_back_release(colours, cluster):
    (image_a, tag_a, _), (image_b, tag_b, _) = colours["a"], colours["b"]
    with pytest.raises(CTTError, match="nothing to roll back to"):
        rollback(cluster, "production", options(), Log())
    release(cluster, "production", image_a, tag_a, options(), Log())
    release(cluster, "production", image_b, tag_b, options(), Log())
    assert "rolled back to" in rollback(cluster, "production", options(), Log())
    assert cluster.live() == "blue" and cluster.image_of("blue") == image_a and known(cluster) == [(image_a, tag_a)]
    with pytest.raises(CTTError, match="nothing earlier to roll back to"):
        rollback(cluster, "production", options(), Log())
    assert cluster.live() == "blue" and cluster.image_of("blue") == image_a


def test_the_lock_admits_one_release_and_expires():
    from deploy.release import release_lock

    cluster = StandInCluster(NAMESPACE, {})  # the lock needs no servers
    with release_lock(cluster, "production", options(holder="first"), Log()):
        with pytest.raises(CTTError, match="being released by first"):
            with release_lock(cluster, "production", options(holder="second"), Log()):
                pass
    assert cluster.record["lock"] is None
    with release_lock(cluster, "production", options(holder="dead", lock_seconds=-1), Log()):
        cluster.fail_after("get configmap", 0)  # the holder dies: its lock is never given back
        cluster._down = True
    cluster.reachable()
    with release_lock(cluster, "production", options(holder="later"), Log()):  # stale: taken over
        assert cluster.record["lock"]["holder"] == "later"


def test_production_refuses_tags_in_one_line(capsys):
    from training.cli import main

    code = main(["deploy", "release", "--env", "production", "--image", "ghcr.io/example/ctt:1.0", "--model-tag", "ctt:x"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "ctt: error: production takes images by digest only (name@sha256:...), not 'ghcr.io/example/ctt:1.0'")


@pytest.mark.parametrize("suite", ["smoke", "integration"])
def test_checks_pass_against_a_live_server_and_the_wrappers_agree(colours, suite):
    _, tag, url = colours["a"]
    for command in ([str(PROJECT / ".venv" / "bin" / "ctt"), "check", suite, "--model-tag", tag],
                    [sys.executable, str(PROJECT / "scripts" / f"{suite}_tests.py")]):
        command = [sys.executable, "-m", "training.cli", *command[1:]] if command[0].endswith("ctt") else command
        result = subprocess.run([*command, "--url", url], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "API_KEY": API_KEY}, cwd="/")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 failed" in result.stdout and "FAIL" not in result.stdout
        assert "auth failure" in result.stdout and "SKIP" not in result.stdout


def test_checks_fail_when_the_service_is_down():
    from training.cli import main

    assert main(["check", "smoke", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1


def test_kubectl_implementation_issues_the_calls_the_interface_promises(tmp_path, monkeypatch):
    """No API server here: a fake `kubectl` on PATH records its arguments and answers like the real one."""
    from deploy.cluster import Kubectl, RecordConflict

    calls = tmp_path / "calls"
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
cat > /dev/null
case "$*" in
  *"get service ctt "*) echo '{{"spec": {{"selector": {{"app.kubernetes.io/color": "green"}}}}}}' ;;
  *"get configmap"*) echo 'Error from server (NotFound): configmaps "ctt-release" not found' >&2; exit 1 ;;
  *replace*) echo 'Error from server (Conflict): the object has been modified' >&2; exit 1 ;;
esac
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cluster = Kubectl("ctt-staging", context="staging")
    assert cluster.live_color() == "green"
    assert cluster.read_record() == ({}, None)
    cluster.write_record({"known_good": []}, None)
    with pytest.raises(RecordConflict):
        cluster.write_record({"known_good": []}, "41")
    cluster.point_service("ctt", "blue")
    cluster.scale("blue", 0)
    recorded = calls.read_text().splitlines()
    assert all(line.startswith("--context staging --namespace ctt-staging ") for line in recorded)
    assert "create --filename -" in recorded[2] and "replace --filename -" in recorded[3]
    assert '"app.kubernetes.io/color": "blue"' in recorded[4] and recorded[5].endswith("scale deployment/ctt-blue --replicas=0")


def test_a_failed_rollback_then_a_failed_release_leave_the_last_good_release_live(colours, cluster):
    """Release A, release B, a rollback to A whose bake fails, a release C whose preview fails: the
    failed rollback once dropped B from the known good releases, and the release after it switched
    live traffic to A (which had just failed its bake) without any check. B must stay live."""
    (image_a, tag_a, url_a), (image_b, tag_b, _) = colours["a"], colours["b"]
    image_c = "ghcr.io/example/ctt@sha256:" + "c3" * 32
    cluster.image_urls[image_c] = url_a  # serves A's version: its preview fails the model tag check for C
    release(cluster, "production", image_a, tag_a, options(), Log())
    release(cluster, "production", image_b, tag_b, options(), Log())
    with pytest.raises(ReleaseFailed, match="bake: average latency.*switched back to green"):
        rollback(cluster, "production", options(max_latency_ms=0.001), Log())
    assert cluster.live() == "green" and known(cluster) == [(image_b, tag_b), (image_a, tag_a)]
    assert cluster.record.get("rollback") is None
    cluster.calls.clear()
    log = Log()
    with pytest.raises(ReleaseFailed, match=f"model tag: /model reports {tag_a}, expected {tag_b}.*not switched"):
        release(cluster, "production", image_c, tag_b, options(), log)
    assert "patch service" not in cluster.calls, log
    assert cluster.live() == "green" and cluster.image_of("green") == image_b
    assert known(cluster) == [(image_b, tag_b), (image_a, tag_a)] and cluster.record["lock"] is None


def test_a_rollback_killed_after_its_switch_is_finished_by_the_next_one(colours, cluster):
    (image_a, tag_a, _), (image_b, tag_b, _) = colours["a"], colours["b"]
    release(cluster, "production", image_a, tag_a, options(), Log())
    release(cluster, "production", image_b, tag_b, options(), Log())
    cluster.fail_after("patch service")  # the rollback's switch lands, then the cluster is gone, as if killed
    with pytest.raises(ReleaseFailed, match="switching back to green failed too"):
        rollback(cluster, "production", options(live_timeout=1), Log())
    cluster.reachable()
    assert cluster.live() == "blue" and cluster.record["rollback"]["to"]["image"] == image_a
    assert known(cluster) == [(image_b, tag_b), (image_a, tag_a)]  # nothing completed: nothing forgotten
    unlock(cluster)
    assert "rolled back to" in rollback(cluster, "production", options(), Log())
    assert cluster.image_of(cluster.live()) == image_a and known(cluster) == [(image_a, tag_a)]


@pytest.mark.parametrize("tag", ["", "ctt:", "ctt:../x", "ctt", "ctt:latest", "ctt:a\nb"])
def test_a_release_names_its_model_version_exactly(capsys, tag):
    from training.cli import main

    code = main(["deploy", "release", "--env", "staging", "--image", "ghcr.io/example/ctt:1.0", f"--model-tag={tag}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--model-tag" in err and "Traceback" not in err
