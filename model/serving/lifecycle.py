"""A worker's life: load the model with retries, tell readiness for the whole server, drain on
SIGTERM.

BentoML runs each worker as its own process, and ``/readyz`` is answered by whichever worker
accepts the connection. So that a pod is Ready only when *every* worker has a warm model (and
not Ready again the moment any of them is shutting down), each worker marks itself in a folder
shared by the workers of one server. A process is named by its pid *and* its start time: in a
container the server is often pid 1 and its workers get the same pids after a restart, and the
folder (in ``/tmp``, an ``emptyDir`` that outlives the container) would otherwise show a dead
worker's marker as a live one. A marker whose process is gone, or is another process now, does
not count.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Generic, TypeVar

logger = logging.getLogger("ctt")
T = TypeVar("T")


def process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (field 22 of ``/proc/PID/stat``);
    with the pid it names one process for the life of the machine. "gone" when no such process
    exists; empty where there is no /proc (then the pid alone names a process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone" if Path("/proc/self/stat").exists() else ""
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: fields after its last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServerReadiness:
    """Readiness of every worker of one ``bentoml serve``: workers share their parent process."""

    def __init__(self, workers: int, folder: Path | None = None):
        self.workers = workers
        parent = os.getppid()
        self.folder = folder or Path(tempfile.gettempdir()) / f"ctt-ready-{parent}-{process_start(parent)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.marker = self.folder / f"{os.getpid()}-{process_start(os.getpid())}.ready"
        self.stopping = False

    def mark_ready(self) -> None:
        self.marker.touch()

    def mark_stopping(self) -> None:
        self.stopping = True
        self.marker.unlink(missing_ok=True)

    def ready_workers(self) -> int:
        count = 0
        for marker in self.folder.glob("*.ready"):
            pid, _, started = marker.stem.partition("-")
            try:
                count += _alive(int(pid)) and process_start(int(pid)) == started
            except ValueError:
                continue
        return count

    def all_ready(self) -> bool:
        return not self.stopping and self.marker.exists() and self.ready_workers() >= self.workers


def raise_open_file_limit(ceiling: int = 1 << 20) -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (at most ``ceiling``);
    returns (before, after). Every connection is a file: under the soft limit most container
    runtimes give (1,024), a thousand idle connections left a worker no descriptor to accept
    another, and every new request failed until they closed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft


class RetryingLoader(Generic[T]):
    """Load in the background; retry a failed load with exponential backoff; after
    ``attempts`` failures give up, so liveness fails and Kubernetes restarts the pod."""

    def __init__(self, load: Callable[[], T], attempts: int, first_delay_s: float = 1.0,
                 on_loaded: Callable[[T], None] | None = None):
        self.load = load
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.on_loaded = on_loaded
        self.value: T | None = None
        self.failures = 0
        self.public_problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="ctt-model-loader", daemon=True)

    def start(self) -> "RetryingLoader[T]":
        self._thread.start()
        return self

    @property
    def gave_up(self) -> bool:
        return self.failures >= self.attempts

    def _run(self) -> None:
        delay = self.first_delay_s
        while not self.gave_up:
            try:
                value = self.load()
            except Exception as exc:
                self.failures += 1
                # The exception (paths, internals) goes to the log only. A CTTError is ours and
                # written for operators (e.g. which file failed its digest check), so /health
                # may show it; anything else is summarised.
                from model.errors import CTTError

                self.public_problem = (str(exc) if isinstance(exc, CTTError)
                                       else "the model failed to load; the service log has the reason")
                last = self.gave_up
                logger.error(f"model load failed (attempt {self.failures} of {self.attempts})"
                             + ("; giving up: liveness now fails" if last else f"; retrying in {delay:.0f} s"),
                             exc_info=True)
                if last:
                    return
                time.sleep(delay)
                delay *= 2
                continue
            self.value = value
            self.public_problem = None
            if self.on_loaded:
                self.on_loaded(value)
            return


class Activity:
    """Requests to the public API in flight in this worker, and when the last one started."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.clock = clock
        self.sleep = sleep
        self.in_flight = 0
        self.last_started = clock()
        self.draining = False  # from SIGTERM on: every answer closes its connection

    def started(self) -> None:
        self.in_flight += 1
        self.last_started = self.clock()

    def finished(self) -> None:
        self.in_flight -= 1

    def wait_quiet(self, quiet_s: float, limit_s: float, since: float | None = None,
                   waiting: Callable[[], int] = lambda: 0) -> bool:
        """Block until nothing is in flight, nothing started for ``quiet_s`` (counted from
        ``since`` at the earliest), and ``waiting()`` connections wait to be accepted; or until
        ``limit_s`` passed. True when it went quiet."""
        start = self.clock()
        deadline = start + limit_s
        since = start if since is None else since
        while self.clock() < deadline:
            if (self.in_flight == 0 and self.clock() - max(self.last_started, since) >= quiet_s
                    and waiting() == 0):
                return True
            self.sleep(0.05)
        return False


def connections_waiting_to_be_accepted() -> int:
    """Connections in the accept queues of this process's listening TCP sockets.

    The workers of one server share the listening socket BentoML's supervisor opened; a
    connection the kernel has completed but no worker has accepted yet is in its queue, and a
    socket closed with connections queued resets them. Linux lists every TCP socket of the network
    namespace in /proc/net/tcp{,6}, a listening one (state 0A) with its accept queue's length as
    rx_queue; this process's own are those whose inode one of its descriptors links to. Read
    from files only (no descriptor is duplicated or touched). Elsewhere, or on any surprise, 0:
    the count must never stop a shutdown."""
    try:
        inodes = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
        waiting = 0
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            try:
                with open(table, encoding="ascii") as file:
                    rows = file.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()  # sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                    waiting += int(fields[4].split(":")[1], 16)
        return waiting
    except Exception:
        return 0


class ActivityMiddleware:
    """Counts this worker's public API requests for the drain. ``activity()`` finds the worker's
    ``Activity`` (its service instance owns it; None before the instance exists)."""

    def __init__(self, app, activity: Callable[[], Activity | None], paths: frozenset[str]):
        self.app = app
        self.activity = activity
        self.paths = paths

    async def __call__(self, scope, receive, send):
        activity = self.activity() if scope["type"] == "http" else None
        if activity is None:
            return await self.app(scope, receive, send)
        if activity.draining:
            send = self._closing(send)
        if scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        activity.started()
        try:
            return await self.app(scope, receive, send)
        finally:
            activity.finished()

    @staticmethod
    def _closing(send):
        """While draining, answers say ``Connection: close``: a client (or a load balancer's pool)
        then sends its next request on a new connection, to a pod still Ready, instead of on a
        kept-alive one that shutdown is about to close under it."""
        async def closing_send(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)
        return closing_send


# Nothing new for this long means the load balancer has stopped sending: then shut down.
QUIET_BEFORE_SHUTDOWN_S = 1.0


def drain_then_shut_down(readiness: ServerReadiness, activity: Activity, drain_limit_s: float) -> None:
    """On SIGTERM: not Ready at once, keep serving until the public API has been quiet for a
    moment since SIGTERM and no connection waits to be accepted (requests still reaching the pod
    while endpoints update, and requests already sent but not yet read, are answered), then hand
    over to uvicorn's graceful shutdown, which stops accepting and finishes what it holds. Without the drain, uvicorn closes connections whose
    request it has not read yet, and their clients see a connection error instead of an answer."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; an in-process test client has none
    previous = signal.getsignal(signal.SIGTERM)

    def shut_down(signum, frame) -> None:
        try:
            # Quiet is counted from SIGTERM, not from the last request this worker read: on a busy
            # machine requests already sent can still be waiting to be accepted, which is no sign
            # that the load balancer has stopped sending.
            quiet = activity.wait_quiet(QUIET_BEFORE_SHUTDOWN_S, drain_limit_s, since=activity.clock(),
                                        waiting=connections_waiting_to_be_accepted)
            logger.info(f"SIGTERM: drained ({'quiet' if quiet else f'limit of {drain_limit_s:.0f} s reached'}); "
                        "shutting down")
        except Exception:
            logger.exception("SIGTERM: the drain failed; shutting down now")
        finally:  # whatever happened above, the worker must still stop
            if callable(previous):
                previous(signum, frame)
            else:
                os._exit(0)

    def handler(signum, frame) -> None:
        if readiness.stopping:  # a second SIGTERM: no more waiting
            if callable(previous):
                previous(signum, frame)
            return
        readiness.mark_stopping()
        activity.draining = True
        threading.Thread(target=shut_down, args=(signum, frame), name="ctt-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
