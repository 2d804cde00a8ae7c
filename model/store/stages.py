"""Stages: which version is approved to be built for staging or production, with the approver,
time, digest and a history, in ``ctt-state/<name>.stages.json`` (outside any version), written
under the store lock."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import CTTError
from model.integrity import write_atomically
from model.store.layout import checked_part, model_name, state_dir
from model.store.lock import store_lock
from model.tags import TagRef, shown

if TYPE_CHECKING:
    from model.store.versions import Version

STAGES = ("staging", "production")


def _stages_path() -> Path:
    return state_dir() / f"{checked_part(model_name(), 'model name')}.stages.json"


def read_stages() -> dict:
    """``{"stages": {stage: [entries, oldest first]}, "history": [...]}``; the last entry of a stage
    is the approved version, the ones before it are what ``rollback`` returns to."""
    path = _stages_path()
    if not path.is_file():
        return {"stages": {}, "history": []}
    try:
        stages = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        stages = None
    if not isinstance(stages, dict) or not isinstance(stages.get("stages", {}), dict):
        raise CTTError(f"{path} is not a valid stages file; restore it or remove it to clear every stage")
    return stages


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise CTTError(f"unknown stage {shown(stage)}: use {' or '.join(STAGES)}")


def _record_stage(stage: str, entry: dict, action: str, stages: dict) -> None:
    stages.setdefault("history", []).append({"stage": stage, "action": action, **entry})
    state_dir().mkdir(parents=True, exist_ok=True)
    write_atomically(_stages_path(), json.dumps(stages, indent=2) + "\n")


def _entry(version: "Version", by: str | None) -> dict:
    return {"tag": version.tag, "digest": version.digest, "at": datetime.now(timezone.utc).isoformat(),
            "by": by or "unknown"}


def set_stage(tag: str, stage: str, by: str | None = None) -> "Version":
    """Approve ``tag`` (a version of this store's model) for ``stage`` after verifying every file of it."""
    from model.store.versions import find_version, resolve_name

    check_stage(stage)
    ref = resolve_name(tag, "TAG")
    find_version(ref)  # an unknown tag is refused before the lock (and its file) is created
    with store_lock():
        version = find_version(ref)
        version.verify()
        stages = read_stages()
        stack = stages.setdefault("stages", {}).setdefault(stage, [])
        entry = _entry(version, by)
        stack.append(entry)
        _record_stage(stage, entry, "set", stages)
    return version


def rollback_stage(stage: str, by: str | None = None) -> "Version":
    """Return ``stage`` to the version it had before the current approval."""
    from model.store.versions import find_version
    from model.tags import exact_tag

    check_stage(stage)
    with store_lock():
        stages = read_stages()
        stack = stages.get("stages", {}).get(stage, [])
        if len(stack) < 2:
            raise CTTError(f"stage {stage} has no earlier version to roll back to")
        previous = stack[-2]
        ref = exact_tag(previous["tag"], f"the tag approved for {stage} before")
        version = find_version(TagRef(ref.name, ref.version), exact=True)
        if version.verify() != previous["digest"]:
            raise CTTError(f"cannot roll {stage} back to {previous['tag']}: it differs from the version approved then")
        stack.pop()
        _record_stage(stage, _entry(version, by), "rollback", stages)
    return version


def stage_version(stage: str) -> "Version":
    """The version approved for ``stage``, verified against the digest recorded at approval."""
    from model.store.versions import find_version
    from model.tags import exact_tag

    check_stage(stage)
    stack = read_stages().get("stages", {}).get(stage, [])
    if not stack:
        raise CTTError(f"no version is approved for {stage}: run 'ctt stage set TAG {stage}'")
    current = stack[-1]
    ref = exact_tag(current["tag"], f"the tag approved for {stage}")
    version = find_version(TagRef(ref.name, ref.version), exact=True)
    if version.verify() != current["digest"]:
        raise CTTError(f"{current['tag']} differs from the version approved for {stage} (digest changed)")
    return version


def stages_of(tag: str) -> list[str]:
    return [stage for stage, stack in read_stages().get("stages", {}).items() if stack and stack[-1]["tag"] == tag]
