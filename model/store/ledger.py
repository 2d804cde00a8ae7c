"""The store's ledger: which versions ctt registered, in which order, with their lineage; and the
history of what was deleted and repaired (what, when, by whom).

"Newest" means one thing everywhere (``ctt models``, ``ctt learn``'s parent, BentoML's ``latest``,
hence what ``bentoml serve`` picks): the last version of the ledger that is in the store. A learned
version goes last. An imported version goes just before the first registered version that descends
from it (whose lineage names it), else last: lineage and registration order, never a clock written
inside an archive by another machine.

``ctt-state/<name>.ledger.json`` is written under the store lock, atomically, before the version it
adds is renamed into the store (an entry whose folder is missing is ignored, and reported). A store
from before the ledger has none: its versions are taken in creation order until the next change
writes one. Versions in ``models/<name>/`` that the ledger does not name were put there around ctt
(``bentoml models import``, a copy): ctt lists none of them, and ``ctt verify`` reports them.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from model.errors import CTTError
from model.store.layout import checked_part, state_dir
from model.tags import tag_problem

LEDGER_FORMAT = 1
HISTORY_FILE = "history.jsonl"


def ledger_path(name: str) -> Path:
    return state_dir() / f"{checked_part(name, 'model name')}.ledger.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def operator() -> str:
    """Who runs this command, for the records: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in this container's passwd
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def read_ledger(name: str) -> list[dict] | None:
    """The ledger's entries, oldest first; None when this store has no ledger yet."""
    path = ledger_path(name)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        document = None
    entries = document.get("versions") if isinstance(document, dict) else None
    if (not isinstance(entries, list) or document.get("format") != LEDGER_FORMAT
            or not all(isinstance(e, dict) and tag_problem(e.get("tag")) is None
                       and e["tag"].partition(":")[0] == name for e in entries)):
        raise CTTError(f"{path} is not a valid ledger of {name!r}; restore it, or move it away to have ctt "
                       "order the versions by creation time again")
    return entries


def ledger_text(name: str, entries: list[dict]) -> str:
    return json.dumps({"format": LEDGER_FORMAT, "name": name, "versions": entries}, indent=2) + "\n"


def new_entry(tag: str, digest: str | None, parent: str | None, lineage: list[str], how: str) -> dict:
    return {"tag": tag, "digest": digest, "parent": parent, "lineage": lineage, "how": how,
            "at": now(), "by": operator()}


def lineage_from(parent: str | None, entries: list[dict]) -> list[str]:
    """A new version's ancestors, parent first, as the ledger knows them."""
    if not parent:
        return []
    known = {e["tag"]: e for e in entries}
    return [parent, *known.get(parent, {}).get("lineage", [])]


def with_entry(entries: list[dict], entry: dict) -> list[dict]:
    """``entries`` with ``entry`` in its place: where the ledger already had it (a version put back),
    else before the first entry descending from it, else last."""
    for index, existing in enumerate(entries):
        if existing["tag"] == entry["tag"]:
            return entries[:index] + [entry] + [e for e in entries[index + 1:] if e["tag"] != entry["tag"]]
    others = list(entries)
    position = next((i for i, e in enumerate(others) if entry["tag"] in e.get("lineage", [])), len(others))
    return others[:position] + [entry] + others[position:]


# ----- history -----------------------------------------------------------------------------
def record(action: str, **details) -> None:
    """Append what was done, when and by whom to ``ctt-state/history.jsonl`` (one JSON line, fsynced)."""
    line = json.dumps({"at": now(), "by": operator(), "action": action, **details}, ensure_ascii=True) + "\n"
    state_dir().mkdir(parents=True, exist_ok=True)
    descriptor = os.open(state_dir() / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_history() -> list[dict]:
    path = state_dir() / HISTORY_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return entries
