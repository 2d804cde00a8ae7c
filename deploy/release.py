"""Blue-green releases that read the cluster, check before and after the switch, and switch back.

    release:  preview <- image; wait for rollout; smoke + integration + model tag on the preview;
              switch the live Service; wait for the live endpoint to report the tag; smoke again;
              bake (error rate and latency from /metrics); record the release as last known good.
    rollback: the same path to the known good release before the live one (smoke checks only).

Every decision starts from what the cluster says (deploy/cluster.py), so every command can be
re-run after a failure half way: a live colour that runs an image no release completed is switched
back to the last known good colour first, and a release that is already live and recorded is a
no-op. One release at a time: a lock in the release record, taken with compare-and-swap.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import httpx

from deploy import checks
from deploy.cluster import Cluster, ClusterError, ColorState, RecordConflict
from deploy.render import environment, release_objects
from deploy.spec import COLORS, LIVE_SERVICE, PREVIEW_SERVICE, Color, ColorPlan, check_image, other
from model.errors import CTTError
from model.tags import exact_tag

# How many known good releases the record keeps: rollback walks back through them.
KNOWN_GOOD_KEPT = 10


class ReleaseFailed(CTTError):
    """A release or rollback did not complete; the message says what failed and what serves now."""


@dataclass
class ReleaseOptions:
    api_key: str | None = None
    request_timeout: float = 30.0
    rollout_timeout: float = 600.0
    live_timeout: float = 120.0        # for the live endpoint to report the new model tag
    bake_seconds: float = 120.0
    bake_interval: float = 5.0
    max_error_rate: float = 0.05       # the same thresholds as the alerts (deploy/monitoring.py)
    max_latency_ms: float = 200.0
    lock_seconds: float = 3600.0       # a lock older than this is stale (its holder died)
    holder: str = field(default_factory=lambda: f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}:"
                                                f"{os.environ.get('GITHUB_RUN_ID', uuid.uuid4().hex[:8])}")


Log = Callable[[str], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----- the release record: known good releases and the lock ----------------------------------
def _update_record(cluster: Cluster, change: Callable[[dict], dict]) -> dict:
    for _ in range(5):
        record, version = cluster.read_record()
        try:
            updated = change(dict(record))
            cluster.write_record(updated, version)
            return updated
        except RecordConflict:
            continue
    raise ClusterError("the release record kept changing under this command; try again")


def known_good(cluster: Cluster) -> list[dict]:
    return cluster.read_record()[0].get("known_good", [])


@contextmanager
def release_lock(cluster: Cluster, env: str, options: ReleaseOptions, log: Log) -> Iterator[None]:
    def take(record: dict) -> dict:
        lock = record.get("lock")
        if lock and lock["holder"] != options.holder and lock["expires_at"] > time.time():
            raise CTTError(f"{env} is being released by {lock['holder']} since {lock['since']}; "
                           f"if that run is gone, 'ctt deploy unlock --env {env}' and run again")
        return {**record, "lock": {"holder": options.holder, "since": _now(),
                                   "expires_at": time.time() + options.lock_seconds}}

    def give_back(record: dict) -> dict:
        if (record.get("lock") or {}).get("holder") == options.holder:
            record["lock"] = None
        return record

    _update_record(cluster, take)
    try:
        yield
    finally:
        try:
            _update_record(cluster, give_back)
        except ClusterError as problem:  # must not hide why the release itself stopped
            log(f"could not release the lock ({problem}); it expires after {options.lock_seconds:.0f} s, "
                f"or 'ctt deploy unlock --env {env}'")


def unlock(cluster: Cluster) -> str | None:
    """Drop the lock whoever holds it (for a run that died); returns the holder it dropped."""
    holder = (cluster.read_record()[0].get("lock") or {}).get("holder")
    _update_record(cluster, lambda record: {**record, "lock": None})
    return holder


# ----- checks through port-forwards -------------------------------------------------------------
def _target(url: str, options: ReleaseOptions) -> checks.Target:
    return checks.Target(url, options.api_key, options.request_timeout)


def _run_suite(cluster: Cluster, service: str, title: str, suite, options: ReleaseOptions, log: Log) -> None:
    with cluster.port_forward(service) as url:
        lines: list[str] = []
        failures = checks.run_checks(title, _target(url, options), suite, stream=_LineSink(lines))
        for line in lines:
            log("   " + line)
    if failures:
        raise ReleaseFailed(f"{title} failed: {failures[0]}" + (f" (and {len(failures) - 1} more)" if failures[1:] else ""))


class _LineSink:
    """A text stream that keeps lines, so check tables go to the release log."""

    def __init__(self, lines: list[str]):
        self.lines, self.pending = lines, ""

    def write(self, text: str) -> int:
        self.pending += text
        *done, self.pending = self.pending.split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        pass


def _wait_for_tag(cluster: Cluster, model_tag: str, options: ReleaseOptions) -> None:
    deadline, served = time.monotonic() + options.live_timeout, None
    while True:
        try:
            # A fresh port-forward each try: it picks a pod behind the Service as the Service is now.
            with cluster.port_forward(LIVE_SERVICE) as url:
                served = checks.served_model_tag(_target(url, options))
            if served == model_tag:
                return
        except (ClusterError, checks.CheckFailed, httpx.HTTPError, KeyError, ValueError) as problem:
            served = f"no answer ({problem})"
        if time.monotonic() > deadline:
            raise ReleaseFailed(f"the live Service did not report {model_tag} within {options.live_timeout:.0f} s "
                                f"(last: {served})")
        time.sleep(1)


_SAMPLE = re.compile(r'^(bentoml_service_request_(?:total|duration_seconds_sum|duration_seconds_count))\{([^}]*)\} (\S+)$', re.M)


def request_counters(metrics_text: str) -> dict[str, float]:
    """/classify totals from BentoML's metrics: requests, 5xx answers, and seconds spent."""
    totals = {"requests": 0.0, "errors": 0.0, "seconds": 0.0}
    for name, labels, value in _SAMPLE.findall(metrics_text):
        if 'endpoint="/classify"' not in labels:
            continue
        if name == "bentoml_service_request_total":
            totals["requests"] += float(value)
            if re.search(r'http_response_code="5\d\d"', labels):
                totals["errors"] += float(value)
        elif name.endswith("_sum"):
            totals["seconds"] += float(value)
    return totals


def _bake(cluster: Cluster, options: ReleaseOptions, log: Log) -> str:
    """Watch the live colour's error rate and latency for the bake window. The bake sends a request
    of its own each interval, so a quiet environment is measured too."""
    with cluster.port_forward(LIVE_SERVICE) as url:
        target = _target(url, options)
        task = checks.fetch_tasks(target)[0]["name"]
        before = request_counters(target.get("/metrics").text)
        deadline = time.monotonic() + options.bake_seconds
        while True:
            target.classify([{"text": checks.SAMPLE_TEXT, "task": task}])
            after = request_counters(target.get("/metrics").text)
            requests = after["requests"] - before["requests"]
            if requests > 0:
                error_rate = (after["errors"] - before["errors"]) / requests
                latency_ms = 1000 * (after["seconds"] - before["seconds"]) / requests
                summary = f"{requests:.0f} requests, error rate {error_rate:.1%}, average latency {latency_ms:.1f} ms"
                if error_rate > options.max_error_rate:
                    raise ReleaseFailed(f"bake: error rate {error_rate:.1%} above {options.max_error_rate:.1%} ({summary})")
                if latency_ms > options.max_latency_ms:
                    raise ReleaseFailed(f"bake: average latency {latency_ms:.1f} ms above {options.max_latency_ms:.0f} ms "
                                        f"({summary})")
            if time.monotonic() >= deadline:
                return summary if requests > 0 else "no /classify requests counted"
            time.sleep(min(options.bake_interval, max(0.0, deadline - time.monotonic())))


# ----- the release path ---------------------------------------------------------------------------
def _plan(env: str, live: Color, target: Color, image: str, states: dict[Color, ColorState]) -> ColorPlan:
    spec = environment(env)
    idle = other(target)
    images = {target: image, idle: states[idle].image or image}  # a new namespace: both colours, one image
    if spec.autoscaling:
        replicas = {color: None for color in COLORS}  # the HPA's; scaling to and from zero is explicit
    else:
        replicas = {target: spec.replicas, idle: states[idle].replicas if states[idle].image else 0}
    return ColorPlan(live=live, images=images, replicas=replicas)


def _restore_last_known_good(cluster: Cluster, live: Color | None, states: dict[Color, ColorState],
                             known: list[dict], log: Log) -> Color | None:
    """A live colour that runs an image no release completed (a run that died half way) goes back
    to the colour that runs the last known good image, if that colour still has ready pods."""
    if not known or live is None or states[live].image == known[0]["image"]:
        return live
    good = next((c for c in COLORS if states[c].image == known[0]["image"] and states[c].ready > 0), None)
    if good is None:
        log(f"live colour {live} runs {states[live].image}, which no release completed, and no colour runs "
            f"the last known good {known[0]['image']}: continuing from {live}")
        return live
    cluster.point_service(LIVE_SERVICE, good)
    log(f"live colour {live} ran {states[live].image}, which no release completed: "
        f"switched back to {good} (last known good {known[0]['model_tag']})")
    return good


def _deliver(cluster: Cluster, env: str, image: str, model_tag: str, options: ReleaseOptions, log: Log,
             preview_suite: list, repair: bool) -> tuple[Color, str]:
    """Put ``image`` behind the live Service through the checks; returns the colour and bake summary.
    On a failure after the switch, the live Service goes back to the colour that served before.
    ``repair`` first puts the last known good colour back live if a run died after its switch."""
    spec = environment(env)
    known = known_good(cluster)
    states = cluster.colors()
    live = cluster.live_color()
    if repair:
        live = _restore_last_known_good(cluster, live, states, known, log)
    if repair and live is not None and states[live].image == image and known and known[0]["image"] == image \
            and known[0]["model_tag"] == model_tag:
        return live, "already live and recorded as last known good; nothing to do"
    target: Color = other(live) if live else "blue"
    # A new namespace: the live Service selects the other, empty colour until the checks pass.
    plan = _plan(env, live or other(target), target, image, states)
    log(f"{env}: {image} -> {target} (preview); live stays {plan.live}")
    cluster.apply(release_objects(env, plan))
    if spec.autoscaling:
        # An HPA does nothing while its target is at zero: scaling up (and a new idle colour down) is ours.
        if states[target].replicas == 0 or states[target].image is None:
            cluster.scale(target, spec.autoscaling.min_replicas)
        if states[other(target)].image is None:
            cluster.scale(other(target), 0)
    cluster.wait_for_rollout(target, options.rollout_timeout)
    if cluster.colors()[target].ready < 1:
        raise ReleaseFailed(f"{target} has no ready pods after its rollout; live stays {plan.live}")
    try:
        _run_suite(cluster, PREVIEW_SERVICE, f"preview ({target}) checks", preview_suite
                   + [("model tag", checks.check_model_tag(model_tag))], options, log)
    except ReleaseFailed as failure:
        raise ReleaseFailed(f"{failure}; not switched, live stays {plan.live}") from None

    previous = live
    cluster.point_service(LIVE_SERVICE, target)
    log(f"{env}: live Service -> {target}")
    try:
        _wait_for_tag(cluster, model_tag, options)
        _run_suite(cluster, LIVE_SERVICE, f"live ({target}) checks",
                   checks.SMOKE_CHECKS + [("model tag", checks.check_model_tag(model_tag))], options, log)
        summary = _bake(cluster, options, log)
    except (ReleaseFailed, ClusterError, checks.CheckFailed, httpx.HTTPError, KeyError, ValueError) as failure:
        if previous is None:
            raise ReleaseFailed(f"{failure}; no earlier release to switch back to") from None
        try:
            cluster.point_service(LIVE_SERVICE, previous)
        except ClusterError as also:
            raise ReleaseFailed(f"{failure}; switching back to {previous} failed too ({also}): "
                                f"run 'ctt deploy rollback --env {env}'") from None
        raise ReleaseFailed(f"{failure}; switched back to {previous} ({states[previous].image})") from None
    return target, summary


def release(cluster: Cluster, env: str, image: str, model_tag: str, options: ReleaseOptions, log: Log) -> str:
    check_image(env, image)
    exact_tag(model_tag, "--model-tag")  # NAME:VERSION, as /model reports it
    with release_lock(cluster, env, options, log):
        color, summary = _deliver(cluster, env, image, model_tag, options, log,
                                  checks.INTEGRATION_CHECKS, repair=True)

        def record_success(record: dict) -> dict:
            entry = {"image": image, "model_tag": model_tag, "color": color, "at": _now()}
            earlier = [k for k in record.get("known_good", []) if k["image"] != image or k["model_tag"] != model_tag]
            return {**record, "known_good": [entry, *earlier][:KNOWN_GOOD_KEPT]}

        _update_record(cluster, record_success)
    return f"{env}: {model_tag} ({image}) is live on {color}; bake: {summary}"


def _same(a: dict, b: dict) -> bool:
    return a["image"] == b["image"] and a["model_tag"] == b["model_tag"]


def rollback(cluster: Cluster, env: str, options: ReleaseOptions, log: Log) -> str:
    """Back to the known good release before the live one (or to the last known good, if what is
    live never completed a release), through the same checks as a release. Only a completed
    rollback changes the known good releases (it forgets the one it left); a failed one changes
    nothing. A rollback that died after its switch is finished by the next one, never reversed."""
    with release_lock(cluster, env, options, log):
        record = cluster.read_record()[0]
        known = record.get("known_good", [])
        if not known:
            raise CTTError(f"no release of {env} has completed yet: nothing to roll back to")
        live = cluster.live_color()
        live_image = cluster.colors()[live].image if live else None
        pending = record.get("rollback")
        if pending and live_image == pending["to"]["image"] and _same(known[0], pending["from"]):
            goal, dropped = pending["to"], pending["from"]
        elif live_image == known[0]["image"]:
            if len(known) < 2:
                raise CTTError(f"{env} runs its only known good release ({known[0]['model_tag']}, "
                               f"{known[0]['image']}): nothing earlier to roll back to")
            goal, dropped = known[1], known[0]
        else:
            goal, dropped = known[0], None
        log(f"{env}: rolling back to {goal['model_tag']} ({goal['image']})")
        # What is under way, so that a re-run after a kill continues towards the same goal.
        _update_record(cluster, lambda r: {**r, "rollback": {"from": dropped, "to": goal} if dropped else None})
        try:
            color, summary = _deliver(cluster, env, goal["image"], goal["model_tag"], options, log,
                                      checks.SMOKE_CHECKS, repair=False)
        except BaseException:
            try:
                _update_record(cluster, lambda r: {**r, "rollback": None})
            except ClusterError as problem:
                log(f"could not clear the rollback under way from the release record ({problem})")
            raise

        def completed(r: dict) -> dict:
            kept = [k for k in r.get("known_good", []) if not (dropped and _same(k, dropped))]
            return {**r, "known_good": kept, "rollback": None}

        _update_record(cluster, completed)
    return f"{env}: rolled back to {goal['model_tag']} ({goal['image']}) on {color}; bake: {summary}"


def status(cluster: Cluster) -> dict:
    record = cluster.read_record()[0]
    return {"live": cluster.live_color(),
            "colors": {c: vars(s) for c, s in cluster.colors().items()},
            "known_good": record.get("known_good", []), "lock": record.get("lock")}
