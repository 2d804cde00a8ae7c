#!/usr/bin/env python
"""`make e2e`: the demo bento as a real container, run the way the production manifests run it.

Steps (each printed with its time):
  1. tools: buildah and podman (installed from Debian's packages where possible);
  2. base image: no image registry is reachable here, so `python:3.11-slim` (the base BentoML's
     generated Dockerfile names) is made locally with debootstrap, once, and cached;
  3. bento: `bentoml build` of the demo model, with PyTorch's CPU wheel taken from a wheel index
     served on loopback for the build only (the committed bentofile names PyTorch's CPU index);
  4. image: `bentoml containerize --backend buildah`, image user UID from the manifests;
  5. run: podman, non-root UID, read-only root, writable tmpfs only where the manifests mount
     emptyDirs, the production ConfigMap's environment, an API key mounted as the Secret is;
  6. /readyz, then `ctt check smoke` against it; the image holds CPU torch and the pinned model;
  7. SIGTERM with requests in flight: every accepted request answered, clean exit.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from deploy import manifests  # noqa: E402
from deploy.spec import ENVIRONMENTS, SECRET_KEYS, SECRET_MOUNT, UID, WRITABLE_PATHS  # noqa: E402
from deploy.local import free_port  # noqa: E402

BIN = Path(sys.executable).parent
BASE_IMAGE = "docker.io/library/python:3.11-slim"
BASE_LABEL = "dev.ctt.local-base=bookworm-minbase-v1"
DEBIAN_MIRROR = os.environ.get("CTT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WORK = Path(os.environ.get("CTT_E2E_WORK", "/var/tmp/ctt-e2e"))
STARTED = time.perf_counter()


class StepFailed(Exception):
    pass


@contextmanager
def step(title: str):
    began = time.perf_counter()
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {title} ...", flush=True)
    try:
        yield
    except StepFailed as failure:
        print(f"FAILED: {title}: {failure}", flush=True)
        sys.exit(1)
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {title}: done in {time.perf_counter() - began:.1f}s", flush=True)


def run(*command: str, check: bool = True, capture: bool = False, env: dict | None = None, **kwargs):
    result = subprocess.run(command, text=True, env={**os.environ, **(env or {})},
                            capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()[-2000:] if capture else ""
        raise StepFailed(f"{' '.join(command[:4])} ... exited {result.returncode} {detail}")
    return result


# ----- 1. tools ---------------------------------------------------------------------------
def container_environment() -> dict:
    """runc (crun fails here), overlay storage, chroot isolation for buildah."""
    config = WORK / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "containers.conf").write_text('[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
                                             'events_logger = "file"\n')
    (config / "storage.conf").write_text('[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\n'
                                         'graphroot = "/var/lib/containers/storage"\n')
    return {"CONTAINERS_CONF": str(config / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(config / "storage.conf"), "BUILDAH_ISOLATION": "chroot"}


def ensure_tools() -> None:
    needed = ["buildah", "podman", "runc", "debootstrap"]
    missing = [tool for tool in needed if not shutil.which(tool)]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, "uidmap", "iptables",
            "fuse-overlayfs", "netavark", "aardvark-dns", "ca-certificates",
            env={"DEBIAN_FRONTEND": "noninteractive"})
        return
    raise StepFailed(f"make e2e needs {', '.join(missing)} (Linux with buildah and podman, run as root or with "
                     "rootless containers set up); nothing was built or run")


# ----- 2. base image ----------------------------------------------------------------------
def podman(*args: str, env: dict, **kwargs):
    return run("podman", *args, env=env, **kwargs)


def ensure_base_image(env: dict) -> str:
    labels = podman("image", "inspect", BASE_IMAGE, "--format", "{{json .Labels}}", env=env, check=False, capture=True)
    if labels.returncode == 0 and BASE_LABEL.split("=")[0] in (labels.stdout or ""):
        return "cached"
    root = WORK / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
        "bookworm", str(root), DEBIAN_MIRROR, capture=True)
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # the generated Dockerfile installs uv with the system pip
    (root / "usr/bin/python").unlink(missing_ok=True)
    (root / "usr/bin/python").symlink_to("python3")
    # HTTPS from build steps must trust what the host trusts (this network re-signs TLS).
    shutil.copy(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    tarball = WORK / "rootfs.tar"
    run("tar", "-C", str(root), "-cf", str(tarball), ".")
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
               "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
               f"LABEL {BASE_LABEL}", 'CMD ["python3"]']
    podman("import", *(arg for change in changes for arg in ("--change", change)), str(tarball), BASE_IMAGE,
           env=env, capture=True)
    tarball.unlink()
    shutil.rmtree(root)
    return "built"


# ----- 3. bento ---------------------------------------------------------------------------
@contextmanager
def torch_wheel_index():
    """A PEP 503 index on loopback holding the local CPU torch wheel, for the image build only."""
    folder = WORK / "wheel-index"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "simple" / "torch").mkdir(parents=True)
    run(str(BIN / "pip"), "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder / "files"),
        "torch==2.13.0", capture=True)
    wheel = next((folder / "files").glob("torch-2.13.0*cpu*.whl"), None)
    if wheel is None:
        raise StepFailed("no CPU build of torch 2.13.0 found locally (pip download took another build)")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (folder / "simple" / "torch" / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a></body></html>\n')
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # uv asks for every package; 404s are expected
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()


def build_bento(index_url: str) -> str:
    """`bentoml build` with the committed bentofile, its PyTorch index swapped for the local one."""
    bentofile = yaml.safe_load((PROJECT / "bentofile.yaml").read_text())
    bentofile["python"]["extra_index_url"] = [index_url]
    bentofile["labels"] = {**bentofile.get("labels", {}), "build": "e2e"}
    path = WORK / "bentofile.e2e.yaml"
    path.write_text(yaml.safe_dump(bentofile, sort_keys=False))
    result = run(str(BIN / "bentoml"), "build", "-f", str(path), "--output", "tag", str(PROJECT), capture=True)
    return result.stdout.strip().splitlines()[-1].replace("__tag__:", "")


# ----- 4. image ---------------------------------------------------------------------------
def containerize(bento: str, env: dict) -> str:
    image = f"localhost/ctt-e2e:{bento.split(':')[1]}"
    run(str(BIN / "bentoml"), "containerize", bento, "--backend", "buildah", "--image-tag", image,
        "--opt", "pull-never", "--opt", "network=host",
        "--opt", f"build-arg=BENTO_USER_UID={UID}", "--opt", f"build-arg=BENTO_USER_GID={UID}", env=env)
    return image


# ----- 5-7. run and check -----------------------------------------------------------------
def host_ulimits() -> list[str]:
    """Explicit limits below what this host allows: podman's defaults exceed them here, and a
    container may lower its limits but not raise them."""
    import resource

    limits = []
    for name, kind, wanted in (("nofile", resource.RLIMIT_NOFILE, 16384), ("nproc", resource.RLIMIT_NPROC, 4096)):
        soft, hard = resource.getrlimit(kind)
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, soft, hard)
        limits += ["--ulimit", f"{name}={value}:{value}"]
    return limits


def start_container(name: str, image: str, env: dict, api_key: str) -> str:
    spec = ENVIRONMENTS["production"]
    port = free_port()
    env_file = WORK / "production.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in manifests.config_env(spec).items()))
    secret_dir = WORK / "secrets"
    secret_dir.mkdir(exist_ok=True)
    (secret_dir / SECRET_KEYS["API_KEY"]).write_text(api_key)
    os.chmod(secret_dir, 0o755)
    os.chmod(secret_dir / SECRET_KEYS["API_KEY"], 0o444)
    # Production refuses to start without a database URL. No PostgreSQL runs beside this check, so
    # the Secret names an SQLite file on the container's data tmpfs (the manifests' data volume).
    (secret_dir / SECRET_KEYS["DATABASE_URL"]).write_text(f"sqlite:///{WRITABLE_PATHS['data']}/feedback.sqlite3")
    os.chmod(secret_dir / SECRET_KEYS["DATABASE_URL"], 0o444)
    tmpfs = [arg for path in WRITABLE_PATHS.values()
             for arg in ("--tmpfs", f"{path}:rw,size=512m,mode=1777")]
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
           "--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           *tmpfs, "--env-file", str(env_file), "--env", f"PORT={port}",
           "--env", f"API_KEY_FILE={SECRET_MOUNT}/{SECRET_KEYS['API_KEY']}",
           "--env", f"DATABASE_URL_FILE={SECRET_MOUNT}/{SECRET_KEYS['DATABASE_URL']}",
           "--volume", f"{secret_dir}:{SECRET_MOUNT}:ro",
           *host_ulimits(),
           "--stop-timeout", str(spec.termination_grace_seconds), image,
           *manifests.deployment("blue")["spec"]["template"]["spec"]["containers"][0]["args"], env=env, capture=True)
    return f"http://127.0.0.1:{port}"


def wait_ready(url: str, name: str, env: dict, timeout: float = 180) -> float:
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        state = podman("inspect", name, "--format", "{{.State.Running}}", env=env, capture=True, check=False)
        if state.stdout.strip() != "true":
            raise StepFailed("the container stopped:\n" + podman("logs", name, env=env, capture=True, check=False).stdout[-3000:])
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StepFailed(f"/readyz not 200 within {timeout} s")


def check_image_contents(name: str, env: dict) -> str:
    probe = ("import json, torch, yaml; bento = yaml.safe_load(open('/home/bentoml/bento/bento.yaml'));"
             "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
             " 'models': [m['tag'] for s in bento['services'] for m in s['models']]}))")
    found = json.loads(podman("exec", name, "python", "-c", probe, env=env, capture=True).stdout)
    if found["cuda"] is not None or "+cpu" not in found["torch"]:
        raise StepFailed(f"the image holds torch {found['torch']} (CUDA {found['cuda']}), not the CPU build")
    if not found["models"] or not all(":" in tag and not tag.endswith(":latest") for tag in found["models"]):
        raise StepFailed(f"the bento does not pin an exact model version: {found['models']}")
    return f"torch {found['torch']}, model {', '.join(found['models'])}"


def sigterm_with_requests_in_flight(name: str, url: str, api_key: str, env: dict) -> str:
    # Two items a request: 48 items over the workers stay within the per-worker queue bound, so
    # every request is accepted and must be answered.
    body = {"items": [{"text": f"Shares rose {i} percent after the budget", "task": "bbc-topic"} for i in range(2)]}
    headers = {"X-API-Key": api_key}

    def call(_):
        try:
            return httpx.post(f"{url}/classify", json=body, headers=headers, timeout=60).status_code
        except httpx.ConnectError:
            return "refused"  # never accepted: the listener had already closed
        except httpx.HTTPError as error:
            return f"lost: {type(error).__name__}"

    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(call, i) for i in range(24)]
        time.sleep(0.3)
        signalled = time.perf_counter()
        podman("kill", "--signal", "TERM", name, env=env, capture=True)
        outcomes = [f.result() for f in futures]
    code = podman("wait", name, env=env, capture=True).stdout.strip()
    stopped_in = time.perf_counter() - signalled
    lost = [o for o in outcomes if isinstance(o, str) and o.startswith("lost")]
    failed = [o for o in outcomes if isinstance(o, int) and o != 200]
    answered = sum(o == 200 for o in outcomes)
    if lost or failed:
        raise StepFailed(f"requests lost or failed during shutdown: {lost + failed}")
    if code != "0":
        raise StepFailed(f"exit code {code} after SIGTERM\n" + podman("logs", name, env=env, capture=True, check=False).stdout[-2000:])
    if answered == 0:
        raise StepFailed("no request was in flight when SIGTERM arrived; the check proved nothing")
    return f"{answered} in-flight requests answered, {outcomes.count('refused')} refused after close, exit {code} in {stopped_in:.1f}s"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="run and check this already built image (skips steps 2-4)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    with step("1. buildah and podman"):
        ensure_tools()
    env = container_environment()
    image = args.image
    if image is None:
        with step("2. base image python:3.11-slim (debootstrap, cached)"):
            print(f"   {ensure_base_image(env)}", flush=True)
        with torch_wheel_index() as index_url:  # the bento names it; the image build uses it
            with step("3. bento (bentoml build)"):
                bento = build_bento(index_url)
                print(f"   {bento}", flush=True)
            with step("4. image (bentoml containerize --backend buildah)"):
                image = containerize(bento, env)
                print(f"   {image}", flush=True)
    api_key = secrets.token_urlsafe(24)
    # Named up front so the container is removed even when `podman run` fails after creating it.
    name = f"ctt-e2e-{secrets.token_hex(4)}"
    try:
        with step("5. container: non-root, read-only root, production config"):
            url = start_container(name, image, env, api_key)
            print(f"   ready in {wait_ready(url, name, env):.1f}s at {url}", flush=True)
        with step("6. smoke tests and image contents"):
            smoke = run(str(Path(sys.executable).parent / "ctt"), "check", "smoke", "--url", url,
                        "--api-key", api_key, check=False, capture=True)
            print(smoke.stdout, flush=True)
            if smoke.returncode != 0:
                raise StepFailed("smoke tests failed")
            print(f"   {check_image_contents(name, env)}", flush=True)
        with step("7. SIGTERM with requests in flight"):
            print(f"   {sigterm_with_requests_in_flight(name, url, api_key, env)}", flush=True)
    finally:
        podman("rm", "--force", "--ignore", name, env=env, capture=True, check=False)
    print(f"e2e passed in {time.perf_counter() - STARTED:.0f}s")


if __name__ == "__main__":
    main()
