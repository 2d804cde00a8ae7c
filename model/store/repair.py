"""What can be wrong with a store, how it is repaired, and how a version is deleted.

Destructive operations are planned first (read-only, nothing created) and carried out under the
store lock after planning again, so the command line can show the plan and act only with
``--yes``. Repair only ever removes leftovers in ``ctt-staging/`` and temporary files; it never
removes a version of ``models/<name>/``, and a leftover that holds a complete version the ledger
or a stage still names is put back into the store instead of removed. Deletions and repairs are
recorded in ``ctt-state/history.jsonl``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import CTTError
from model.integrity import MODEL_YAML, fsync_path, version_problems, write_atomically
from model.store.layout import (
    LATEST_FILE, STAGING_SEPARATOR, contained_version, latest_path, model_name, name_dir, staging_dir,
    staging_name, state_dir, version_dir,
)
from model.store.ledger import ledger_path, ledger_text, lineage_from, new_entry, read_ledger, record, with_entry
from model.store.lock import lock_is_free, store_lock
from model.store.stages import read_stages
from model.store.versions import (
    StoreWriteFailed, Version, commit_version, describe, get_version, ledger_entries, list_versions,
    newest_tag, present_versions, read_version, resolve_name, write_latest,
)
from model.tags import part_problem, shown


# ----- problems ------------------------------------------------------------------------------
def _approved_tags() -> set[str]:
    return {stack[-1]["tag"] for stack in read_stages().get("stages", {}).values() if stack}


def store_problems(tag: str | None = None, check_all: bool = True) -> list[str]:
    """One line per problem: damaged versions, versions put in or taken out around ctt, leftovers
    of killed runs, a stale ``latest``, stage approvals or lineage that no longer match the
    versions' digests. Creates nothing."""
    if tag is not None:
        version = get_version(tag, "verify TAG")
        return version_problems(version.path) + _ledger_mismatch([version])
    name = model_name()
    problems: list[str] = []
    present = present_versions(name)
    entries = read_ledger(name)
    versions = list_versions(name)
    by_tag = {v.tag: v for v in versions}
    folder = name_dir(name)
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.name == LATEST_FILE or child.name.startswith(f".{LATEST_FILE}."):
                continue
            if part_problem(child.name) is not None or child.is_symlink() or not child.is_dir():
                problems.append(f"{shown(str(child))}: not a model version (a stray file, link or folder in the "
                                "store); ctt ignores it: remove it by hand")
            elif f"{name}:{child.name}" not in present:
                problems.append(f"{name}:{child.name}: not a complete version ({MODEL_YAML} missing or unreadable); "
                                "'ctt models delete --force' removes it")
    if entries is not None:
        registered = {e["tag"] for e in entries}
        for foreign in sorted(set(present) - registered):
            problems.append(f"{foreign}: in the store, but ctt never registered it (put there by 'bentoml models "
                            "import' or by hand?); ctt ignores it: restore versions with 'ctt import', and "
                            "'ctt models delete --force' removes this one")
        for entry in entries:
            if entry["tag"] not in present:
                problems.append(f"{entry['tag']}: registered, but missing from the store (removed by 'bentoml models "
                                "delete' or by hand?); restore it from a backup, or 'ctt verify --repair' forgets it")
    for version in versions if check_all else versions[:1]:
        problems += version_problems(version.path)
        parent = by_tag.get(version.parent or "")
        recorded = version.metadata.get("parent_manifest_sha256")
        if parent is not None and recorded and parent.digest != recorded:
            problems.append(f"{version.tag}: its parent {parent.tag} is not the version it was learned from "
                            "(parent digest differs)")
    problems += _ledger_mismatch(versions if check_all else versions[:1])
    if versions:
        latest = latest_path(name)
        pointed = latest.read_text().strip() if latest.is_file() else None
        if pointed != versions[0].version:
            problems.append(f"{name}: BentoML's latest points to {shown(pointed)}, the newest version is "
                            f"{versions[0].tag}; 'ctt verify --repair' fixes it")
    for stage, entry in read_stages().get("stages", {}).items():
        if not entry:
            continue
        current = entry[-1]
        version = by_tag.get(current["tag"])
        if version is None:
            problems.append(f"stage {stage}: approved version {current['tag']} is not in the store")
        elif version.digest != current["digest"]:
            problems.append(f"stage {stage}: {current['tag']} differs from the version that was approved")
    if lock_is_free(name):  # a staging folder under a held lock is a registration in progress
        for leftover in _leftovers(name):
            problems.append(f"leftover of an interrupted run: {leftover}; 'ctt verify --repair' "
                            + ("puts it back" if _restorable(leftover, name, present) else "removes it"))
    return problems


def _ledger_mismatch(versions: list[Version]) -> list[str]:
    if not versions:
        return []
    recorded = {e["tag"]: e.get("digest") for e in (read_ledger(versions[0].name) or [])}
    return [f"{v.tag}: differs from the version ctt registered (its manifest digest changed)"
            for v in versions if recorded.get(v.tag) not in (None, v.digest)]


# ----- repair --------------------------------------------------------------------------------
def _leftovers(name: str) -> list[Path]:
    prefix = f"{name}{STAGING_SEPARATOR}"
    found = []
    if staging_dir().is_dir():
        found += [p for p in sorted(staging_dir().iterdir()) if p.name.startswith(prefix)]
    if name_dir(name).is_dir():
        found += [p for p in sorted(name_dir(name).iterdir())
                  if p.name.startswith(f".{LATEST_FILE}.") and not p.is_dir()]
    if state_dir().is_dir():
        found += [p for p in sorted(state_dir().iterdir())
                  if p.name.startswith(f".{ledger_path(name).name}.") and not p.is_dir()]
    return found


def _restorable(leftover: Path, name: str, present: dict[str, Version]) -> Version | None:
    """A leftover that is a complete version which the ledger or a stage still names, and which the
    store lacks: a commit or a deletion killed half way. Repair puts it back, never removes it."""
    if leftover.is_symlink() or not leftover.is_dir():
        return None
    staged = read_version(leftover)
    if staged is None or staged.name != name or part_problem(staged.version) or staged.tag in present:
        return None
    named = {e["tag"] for e in read_ledger(name) or []} | _approved_tags()
    if staged.tag not in named or version_problems(leftover):
        return None
    return staged


@dataclass
class RepairPlan:
    remove: list[Path] = field(default_factory=list)
    restore: list[tuple[Path, Version]] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)  # ledger entries whose version is gone
    latest: str | None = None  # the tag latest will point to

    def lines(self) -> list[str]:
        return ([f"remove {path}" for path in self.remove]
                + [f"put {version.tag} back into the store from {path}" for path, version in self.restore]
                + [f"forget {tag} (registered, but no longer in the store)" for tag in self.forget]
                + ([f"point latest at {self.latest}"] if self.latest else []))

    def __bool__(self) -> bool:
        return bool(self.remove or self.restore or self.forget or self.latest)


def repair_plan() -> RepairPlan:
    """What ``ctt verify --repair`` would do now; reads only."""
    name = model_name()
    present = present_versions(name)
    plan = RepairPlan()
    for leftover in _leftovers(name):
        staged = _restorable(leftover, name, present)
        if staged is not None and staged.tag not in [v.tag for _, v in plan.restore]:
            plan.restore.append((leftover, staged))
        else:
            plan.remove.append(leftover)
    coming_back = {v.tag for _, v in plan.restore}
    entries = read_ledger(name)
    if entries is not None:
        plan.forget = [e["tag"] for e in entries if e["tag"] not in present and e["tag"] not in coming_back]
    entries = ledger_entries(name, present)
    for _, version in plan.restore:
        if version.tag not in {e["tag"] for e in entries}:
            entries = with_entry(entries, new_entry(version.tag, version.digest, version.parent,
                                                    lineage_from(version.parent, entries), "restored"))
    newest = newest_tag(name, entries, set(present) | coming_back)
    latest = latest_path(name)
    pointed = latest.read_text().strip() if latest.is_file() else None
    if newest and pointed != newest.partition(":")[2]:
        plan.latest = newest
    return plan


def repair_store() -> list[str]:
    """Carry out the repair plan under the store lock; returns what was done, one line each."""
    name = model_name()
    done = []
    with store_lock():
        plan = repair_plan()
        for leftover, version in plan.restore:
            known = next((e for e in ledger_entries(name) if e["tag"] == version.tag), None)
            staged = staging_dir() / staging_name(name, "restoring")
            os.rename(leftover, staged)
            interrupted = commit_version(staged, version.tag, version.digest, version.parent,
                                         known.get("lineage") if known else None,
                                         known.get("how", "restored") if known else "restored")
            done.append(f"put {version.tag} back into the store")
            if interrupted:
                record("repair", model=name, done=done)
                raise KeyboardInterrupt(f"interrupted; {version.tag} had already been put back")
        for leftover in plan.remove:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
            done.append(f"removed {leftover}")
        if plan.forget:
            entries = [e for e in ledger_entries(name) if e["tag"] not in plan.forget]
            write_atomically(ledger_path(name), ledger_text(name, entries))
            done += [f"forgot {tag} (no longer in the store)" for tag in plan.forget]
        before = latest_path(name).read_text().strip() if latest_path(name).is_file() else None
        write_latest(name)
        after = latest_path(name).read_text().strip() if latest_path(name).is_file() else None
        if after != before and after:
            done.append(f"latest now points to {name}:{after}")
        if done:
            record("repair", model=name, done=done)
    return done


# ----- delete --------------------------------------------------------------------------------
@dataclass
class Deletion:
    tag: str
    folder: Path
    kind: str  # "registered", "not registered by ctt", "damaged"
    references: list[str]
    files: int
    bytes: int

    def line(self) -> str:
        refs = f"; referenced by {', '.join(self.references)}" if self.references else ""
        return f"{self.tag} ({self.kind}, {self.files} files, {self.bytes} bytes, {self.folder}){refs}"


def deletion_plan(tag: str, force: bool = False) -> Deletion:
    """What deleting ``tag`` means, or why it is refused; reads only. The tag must name one
    version exactly (no prefix, not 'latest'), of this store's model, in a real folder directly
    under ``models/<name>/``."""
    ref = resolve_name(tag, "TAG")
    if ref.version is None:
        raise CTTError(f"TAG {shown(tag)}: name the version to delete explicitly ('ctt models' lists them), "
                       "not 'latest'")
    wanted = f"{ref.name}:{ref.version}"
    if not os.path.lexists(version_dir(ref.name, ref.version)):
        close = [v.tag for v in list_versions() if v.tag.startswith(wanted)]
        hint = f" (did you mean {close[0]}? name the whole version)" if len(close) == 1 else ""
        raise CTTError(f"model version {wanted} is not in the BentoML model store{hint}")
    folder = contained_version(ref.name, ref.version)
    registered = {v.tag for v in list_versions()}
    if wanted in registered:
        kind = "registered"
    elif wanted in present_versions():
        kind = "not registered by ctt"
    else:
        kind = "damaged"
    references = []
    if kind == "registered":
        references = [f"stage {stage}" for stage, stack in read_stages().get("stages", {}).items()
                      if any(entry["tag"] == wanted for entry in stack)]
        references += [f"child version {v.tag}" for v in list_versions() if v.parent == wanted]
    if not force and kind != "registered":
        raise CTTError(f"{wanted} is {kind}: --force deletes it")
    if not force and references:
        raise CTTError(f"refusing to delete {wanted}: referenced by {', '.join(references)} "
                       "(--force deletes it anyway)")
    files = [Path(d) / f for d, _, fs in os.walk(folder) for f in fs]
    return Deletion(wanted, folder, kind, references, len(files),
                    sum(p.lstat().st_size for p in files if os.path.lexists(p)))


def delete_version(tag: str, force: bool = False) -> Deletion:
    """Delete one version (planned first, so a refused or mistyped tag creates nothing)."""
    deletion_plan(tag, force)
    name = model_name()
    with store_lock():
        plan = deletion_plan(tag, force)
        # Out of the store in one rename first, so a kill never leaves half a version listed.
        doomed = staging_dir() / staging_name(name, "deleted")
        try:
            staging_dir().mkdir(parents=True, exist_ok=True)
            os.rename(plan.folder, doomed)
        except OSError as exc:
            raise StoreWriteFailed(f"could not delete {plan.tag}: {describe(exc)}; nothing was deleted") from None
        entries = read_ledger(name)
        ledger_changed = False
        try:
            fsync_path(plan.folder.parent)
            if entries is not None and any(e["tag"] == plan.tag for e in entries):
                write_atomically(ledger_path(name), ledger_text(name, [e for e in entries if e["tag"] != plan.tag]))
                ledger_changed = True
            write_latest(name)
        except OSError as exc:
            os.rename(doomed, plan.folder)
            if ledger_changed:
                write_atomically(ledger_path(name), ledger_text(name, entries))
            raise StoreWriteFailed(f"could not delete {plan.tag}: {describe(exc)}; nothing was deleted") from None
        record("delete", model=name, tag=plan.tag, kind=plan.kind, forced=force, references=plan.references,
               files=plan.files, bytes=plan.bytes)
        shutil.rmtree(doomed)
    return plan

