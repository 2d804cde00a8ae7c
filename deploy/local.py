"""Run a real `bentoml serve` process on loopback: used by the tests, `scripts/e2e.py` and
`benchmarks/serve.py`, and shipped in the package so none of them imports from another's folder."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

# The source checkout when installed editable (where `service.py` lives); servers start there.
PROJECT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).parent / "bentoml")

__all__ = ["BENTOML", "PROJECT", "bentoml_serve", "free_port", "server_process", "wait_ready"]


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range. A port the kernel handed out
    (bind to port 0) is handed out again to the next caller, and `bentoml serve` reserves its own
    internal ports that way before it binds ours: a port from outside that range cannot be taken
    in between (seen as "Address already in use" when a test's server started)."""
    ephemeral = _ephemeral_ports()
    candidates = [port for port in range(10000, 32768) if port not in ephemeral]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0, ready_path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout} s")


@contextmanager
def server_process(command: list[str], port: int, env: dict | None = None, log_path: Path | None = None,
                   timeout: float = 120.0, cwd: Path = PROJECT, ready_path: str = "/readyz",
                   environ: dict | None = None):
    """Run a server command on loopback ``port`` until ``ready_path`` answers 200; yields its URL.
    Its environment is ``environ`` (default: this process's) with ``env`` on top."""
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=cwd, env={**(os.environ if environ is None else environ), **(env or {})},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, process, timeout, ready_path)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if log_path:
            log.close()


@contextmanager
def bentoml_serve(target: str = "service:CTT", env: dict | None = None, log_path: Path | None = None,
                  timeout: float = 120.0, cwd: Path = PROJECT):
    """Run `bentoml serve TARGET` on a free loopback port; yields its base URL.

    Each server gets a BentoML home of its own that links to the shared store's models and bentos:
    BentoML keeps its Prometheus multiprocess files under the home and clears them when a server
    starts, so servers sharing a home would wipe each other's metrics."""
    port = free_port()
    store = Path((env or {}).get("BENTOML_HOME") or os.environ["BENTOML_HOME"])
    with tempfile.TemporaryDirectory(prefix="ctt-serve-home-") as home:
        for folder in ("models", "bentos"):
            (store / folder).mkdir(parents=True, exist_ok=True)
            os.symlink(store / folder, Path(home) / folder)
        command = [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)]
        with server_process(command, port, {**(env or {}), "BENTOML_HOME": home}, log_path, timeout, cwd) as url:
            yield url
