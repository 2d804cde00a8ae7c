"""`ctt deploy`: render manifests, promote a colour, roll back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from model.errors import CTTError

PROJECT = Path(__file__).resolve().parent.parent
SMOKE_TESTS = PROJECT / "scripts" / "smoke_tests.py"


def _apply(overlay: Path) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise CTTError("--apply needs kubectl on PATH")
    result = subprocess.run([kubectl, "apply", "-k", str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CTTError(f"kubectl apply -k {overlay} failed: {result.stderr.strip().splitlines()[-1:]}")
    print(result.stdout.strip(), file=sys.stderr)


def _smoke(env: str, url: str | None) -> bool:
    command = [sys.executable, str(SMOKE_TESTS), "--environment", env] + (["--url", url] if url else [])
    print(f"post-switch check: {' '.join(command[1:])}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout, file=sys.stderr, end="")
    return result.returncode == 0


def cmd_render(args) -> int:
    from deploy.render import render

    folder = render(args.env, args.image, Path(args.out))
    print(folder)
    return 0


def _switch(args, to) -> int:
    from deploy.render import overlay_dir, render_overlay, environment, switch

    out = Path(args.out)
    before, after = switch(args.env, to, out)
    overlay = overlay_dir(out, args.env)
    if before.active == after.active:
        print(f"{args.env}: {after.active} already serves; nothing to switch", file=sys.stderr)
        return 0
    print(f"{args.env}: active {before.active} -> {after.active} (preview is now {after.preview})", file=sys.stderr)
    if args.apply:
        _apply(overlay)
    if args.no_check or _smoke(args.env, args.url):
        if not args.apply:
            print(f"manifests written; deploy with: kubectl apply -k {overlay}", file=sys.stderr)
        return 0
    render_overlay(out, environment(args.env), before)
    if args.apply:
        _apply(overlay)
    raise CTTError(f"smoke tests failed after switching {args.env} to {after.active}: "
                   f"rolled back, {before.active} serves again")


def cmd_promote(args) -> int:
    return _switch(args, args.to)


def cmd_rollback(args) -> int:
    return _switch(args, None)


def add_deploy_parser(sub) -> None:
    from deploy.render import DEFAULT_OUT
    from deploy.spec import ENVIRONMENTS

    deploy = sub.add_parser("deploy", help="Kubernetes manifests: render, promote, rollback")
    commands = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    def common(parser):
        parser.add_argument("--env", required=True, choices=list(ENVIRONMENTS))
        parser.add_argument("--out", default=str(DEFAULT_OUT), help="layout folder (default: deploy/)")

    p = commands.add_parser("render", help="write the kustomize base and the environment's overlay")
    common(p)
    p.add_argument("--image", help="image reference, ideally name@sha256:digest; goes to the preview colour")
    p.set_defaults(run=cmd_render)

    for name, helper, runner in (("promote", "point the active Service at a colour", cmd_promote),
                                 ("rollback", "point the active Service back at the other colour", cmd_rollback)):
        p = commands.add_parser(name, help=helper)
        common(p)
        if name == "promote":
            p.add_argument("--to", required=True, choices=["blue", "green"])
        p.add_argument("--apply", action="store_true", help="also kubectl apply -k the overlay")
        p.add_argument("--url", help="active URL for the post-switch smoke tests (default: scripts/environments.yaml)")
        p.add_argument("--no-check", action="store_true", help="skip the post-switch smoke tests")
        p.set_defaults(run=runner)
