"""One writer at a time per model name, across processes: an OS file lock (``filelock``), so a
killed holder releases it at once. Nested store operations in one process re-enter it."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from model.errors import CTTError
from model.store.layout import model_name, state_dir

_held: dict[str, int] = {}  # lock path -> depth


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lock_path(name: str | None = None) -> Path:
    from model.store.layout import checked_part

    return state_dir() / f"{checked_part(name or model_name(), 'model name')}.lock"


@contextmanager
def store_lock(wait: bool = True, say: Callable[[str], None] = _say, name: str | None = None) -> Iterator[None]:
    """Hold the store's lock for ``name`` (default: CTT_MODEL_NAME)."""
    from filelock import FileLock, Timeout

    name = name or model_name()
    path = str(lock_path(name))  # checks the name before anything is created
    try:
        state_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTTError(f"cannot create the model store's lock folder {state_dir()}: {exc.strerror}") from None
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    lock = FileLock(path, thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise CTTError(f"another ctt command is changing the model store {name!r} "
                           f"(lock {path}); try again later, or leave out --no-wait to wait for it") from None
        say(f"waiting for another ctt command to finish changing the model store {name!r} (lock {path})")
        lock.acquire()
    except OSError as exc:
        raise CTTError(f"cannot take the model store's lock {path}: {exc.strerror}") from None
    _held[path] = 1
    try:
        yield
    finally:
        _held.pop(path, None)
        lock.release()


def lock_is_free(name: str | None = None) -> bool:
    """No writer holds the lock now (a store never locked has none); creates nothing."""
    from filelock import FileLock, Timeout

    path = lock_path(name)
    if _held.get(str(path)) or not path.exists():
        return True
    lock = FileLock(str(path), thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


@contextmanager
def interrupts_deferred() -> Iterator[list]:
    """Hold back Ctrl-C while a change commits, so the store and the user's report agree."""
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        # None means a handler installed outside Python; Python's own is the sensible fallback.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
