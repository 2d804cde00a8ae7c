"""`ctt deploy`: render the committed layout, release an image, roll back, show, unlock; and
`ctt check`: the smoke and integration checks against any URL."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from deploy.checks import add_check_parser


def connect(env: str, context: str | None):
    """The cluster of ``env`` (tests replace this with a stand-in)."""
    from deploy.cluster import Kubectl
    from deploy.render import environment

    return Kubectl(environment(env).namespace, context)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _options(args):
    from deploy.release import ReleaseOptions

    return ReleaseOptions(api_key=args.api_key, bake_seconds=args.bake_seconds, rollout_timeout=args.rollout_timeout,
                          max_error_rate=args.max_error_rate, max_latency_ms=args.max_latency_ms)


def cmd_render(args) -> int:
    from deploy.render import render

    print(render(args.env, Path(args.out)))
    return 0


def cmd_release(args) -> int:
    from deploy.release import release
    from deploy.spec import check_image

    from model.tags import exact_tag

    # Before any cluster call: a malformed image or model tag is refused even with no cluster.
    check_image(args.env, args.image)
    exact_tag(args.model_tag, "--model-tag")
    print(release(connect(args.env, args.context), args.env, args.image, args.model_tag, _options(args), _log))
    return 0


def cmd_rollback(args) -> int:
    from deploy.release import rollback

    print(rollback(connect(args.env, args.context), args.env, _options(args), _log))
    return 0


def cmd_status(args) -> int:
    from deploy.release import status

    print(json.dumps(status(connect(args.env, args.context)), indent=2))
    return 0


def cmd_unlock(args) -> int:
    from deploy.release import unlock

    holder = unlock(connect(args.env, args.context))
    print(f"{args.env}: lock of {holder} dropped" if holder else f"{args.env}: was not locked")
    return 0


def add_deploy_parser(sub) -> None:
    from deploy.render import DEFAULT_OUT
    from deploy.spec import ENVIRONMENTS

    deploy = sub.add_parser("deploy", help="Kubernetes: render manifests, release, roll back")
    commands = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    def environment(parser, cluster: bool = True):
        parser.add_argument("--env", required=True, choices=list(ENVIRONMENTS))
        if cluster:
            parser.add_argument("--context", help="kubeconfig context (default: the current one)")

    def checked(parser):
        parser.add_argument("--api-key", default=os.environ.get("API_KEY") or None,
                            help="API key for the checks (default: $API_KEY)")
        parser.add_argument("--bake-seconds", type=float, default=120.0,
                            help="how long to watch the live colour after the switch (default 120)")
        parser.add_argument("--max-error-rate", type=float, default=0.05, help="bake: highest 5xx share of /classify")
        parser.add_argument("--max-latency-ms", type=float, default=200.0, help="bake: highest average /classify latency")
        parser.add_argument("--rollout-timeout", type=float, default=600.0, help="seconds to wait for the rollout")

    p = commands.add_parser("render", help="write the colour-neutral kustomize base and the environment's overlay")
    environment(p, cluster=False)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="layout folder (default: ./deploy)")
    p.set_defaults(run=cmd_render)

    p = commands.add_parser("release", help="image -> idle colour, check it, switch, check, bake; switch back on failure")
    environment(p)
    p.add_argument("--image", required=True, help="image reference; production takes name@sha256:<digest> only")
    p.add_argument("--model-tag", required=True, help="the model version the image serves, NAME:VERSION; /model must report it")
    checked(p)
    p.set_defaults(run=cmd_release)

    p = commands.add_parser("rollback", help="back to the known good release before the live one")
    environment(p)
    checked(p)
    p.set_defaults(run=cmd_rollback)

    p = commands.add_parser("status", help="live colour, each colour's image, known good releases, lock")
    environment(p)
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("unlock", help="drop the release lock of a run that died")
    environment(p)
    p.set_defaults(run=cmd_unlock)

    add_check_parser(sub)
