"""Failure injection for tests: ``CTT_TEST_KILL_AT=<step>[:ACTION]`` at a named step of a store
operation. ACTION: ``KILL`` (the default, SIGKILL), ``INT`` (Ctrl-C), or an errno name (``ENOSPC``,
``EIO``, ``EACCES``) raised as the OSError a write at that step would raise. Unset, it costs one
environment lookup per step."""

from __future__ import annotations

import errno
import os
import signal

KILL_HOOK_VARIABLE = "CTT_TEST_KILL_AT"
INJECTED_ERRORS = ("ENOSPC", "EIO", "EACCES")


def checkpoint(step: str) -> None:
    wanted = os.environ.get(KILL_HOOK_VARIABLE)
    if not wanted:
        return
    name, _, action = wanted.partition(":")
    if name != step:
        return
    if action in INJECTED_ERRORS:
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), signal.SIGINT if action == "INT" else signal.SIGKILL)
