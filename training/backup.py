"""Backup and restore of model versions: ``ctt export`` and ``ctt import``.

A backup is a catalogue (``ctt-backup.json``) plus one ``bentoml models export`` archive
(``.bentomodel``) per version. The catalogue lists every version oldest first with its parent,
its lineage, its manifest digest and the sha256 of its archive, so a restore can check each
archive before reading it and each imported version against the digest it had when exported.
Written as a single ``.tar`` file, the backup's own sha256 is printed on export and can be
pinned on import (``--sha256``); written as a folder, the catalogue's sha256 plays that part.

An import lands atomically: each version is imported by BentoML into a scratch store beside the
real one, verified, fsynced and renamed into ``models/<name>/`` under the store lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from model.errors import CTTError
from model.integrity import fsync_path, fsync_tree, sha256_file, verify_version, version_problems
from model.store import (
    Version, _versions_of, _write_latest, checkpoint, get_version, list_versions, models_dir, staging_dir,
    staging_name, store_lock,
)

CATALOGUE = "ctt-backup.json"
BACKUP_FORMAT = 1


# ----- choosing versions ---------------------------------------------------------------------
def lineage(version: Version, by_tag: dict[str, Version]) -> list[str]:
    """Tags from ``version``'s parent back to the first version."""
    chain, seen, current = [], {version.tag}, version.parent
    while current and current not in seen:
        chain.append(current)
        seen.add(current)
        current = by_tag[current].parent if current in by_tag else None
    return chain


def select_versions(tags: list[str], range_spec: str | None, everything: bool) -> list[Version]:
    """Versions to export, oldest first: named ones, ``A..B`` (B and its ancestors back to A), or all."""
    if sum(bool(x) for x in (tags, range_spec, everything)) != 1:
        raise CTTError("name the versions to export: TAG..., --range OLDER..NEWER, or --all")
    versions = list_versions()
    by_tag = {v.tag: v for v in versions}
    if everything:
        chosen = versions
        if not chosen:
            raise CTTError("the model store has no versions to export")
    elif range_spec:
        older_tag, separator, newer_tag = range_spec.partition("..")
        if not separator or not older_tag or not newer_tag:
            raise CTTError(f"--range {range_spec!r}: use OLDER..NEWER, e.g. ctt:abc..ctt:def")
        older, newer = get_version(older_tag), get_version(newer_tag)
        chain = [newer.tag, *lineage(newer, by_tag)]
        if older.tag not in chain:
            raise CTTError(f"--range: {older.tag} is not an ancestor of {newer.tag}")
        chosen = [by_tag[t] for t in chain[: chain.index(older.tag) + 1]]
    else:
        chosen = list({v.tag: v for v in (get_version(t) for t in tags)}.values())
    return sorted(chosen, key=lambda v: v.created)


# ----- export --------------------------------------------------------------------------------
def check_destination(destination: str | Path) -> Path:
    """A backup never overwrites anything: a new .tar file, or a new or empty folder."""
    # Absolute: BentoML's exporter reads a relative path as one under the filesystem root.
    destination = Path(destination).absolute()
    as_tar = destination.suffix == ".tar"
    if destination.exists() and not (destination.is_dir() and not as_tar and not any(destination.iterdir())):
        raise CTTError(f"{destination} already exists; choose a new file or an empty folder")
    if not destination.parent.is_dir():
        raise CTTError(f"{destination.parent} is not a folder")
    return destination


def export_versions(versions: list[Version], destination: str | Path) -> tuple[Path, str]:
    """Write a backup; returns its path and digest (the tar file's sha256, or the catalogue's)."""
    import bentoml

    destination = check_destination(destination)
    as_tar = destination.suffix == ".tar"
    all_versions = {v.tag: v for v in list_versions()}
    # Built beside the destination and moved into place last: an interrupted export leaves no
    # backup that looks complete.
    work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        entries = []
        for version in versions:
            digest = verify_version(version.path)  # never back up a damaged version
            file_name = f"{version.tag.replace(':', '-')}.bentomodel"
            bentoml.models.export_model(version.tag, str(work / file_name))
            entries.append({
                "tag": version.tag, "created": version.created, "parent": version.parent,
                "lineage": lineage(version, all_versions), "manifest_sha256": digest,
                "file": file_name, "sha256": sha256_file(work / file_name), "bytes": (work / file_name).stat().st_size,
            })
        catalogue = {"format": BACKUP_FORMAT, "created": datetime.now(timezone.utc).isoformat(), "versions": entries}
        (work / CATALOGUE).write_text(json.dumps(catalogue, indent=2) + "\n", encoding="utf-8")
        if as_tar:
            partial = work / "backup.tar"
            with tarfile.open(partial, "w") as archive:
                for name in [CATALOGUE, *(e["file"] for e in entries)]:
                    archive.add(work / name, arcname=name)
            fsync_path(partial)
            os.replace(partial, destination)
            fsync_path(destination.parent)
            return destination, sha256_file(destination)
        fsync_tree(work)
        if destination.exists():
            destination.rmdir()
        os.rename(work, destination)
        fsync_path(destination.parent)
        return destination, sha256_file(destination / CATALOGUE)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----- import --------------------------------------------------------------------------------
def _unpack(source: Path, into: Path) -> None:
    try:
        with tarfile.open(source, "r:*") as archive:
            for member in archive.getmembers():
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise CTTError(f"{source}: unexpected entry {member.name!r}; not a ctt backup")
            archive.extractall(into, filter="data")
    except tarfile.TarError as exc:
        raise CTTError(f"{source}: not a readable backup archive ({exc})") from None


def _read_catalogue(folder: Path, source: Path) -> list[dict]:
    try:
        catalogue = json.loads((folder / CATALOGUE).read_text(encoding="utf-8"))
        entries = catalogue["versions"]
        for entry in entries:
            entry["tag"], entry["file"], entry["sha256"], entry["manifest_sha256"]  # noqa: B018 (presence)
    except FileNotFoundError:
        raise CTTError(f"{source}: has no {CATALOGUE}; not a ctt backup") from None
    except (ValueError, KeyError, TypeError):
        raise CTTError(f"{source}: {CATALOGUE} is not a valid catalogue") from None
    if catalogue.get("format") != BACKUP_FORMAT:
        raise CTTError(f"{source}: backup format {catalogue.get('format')!r} is not supported")
    for entry in entries:
        if Path(entry["file"]).name != entry["file"]:
            raise CTTError(f"{source}: catalogue names a file outside the backup: {entry['file']!r}")
    return entries


def backup_digest(source: str | Path) -> str:
    source = Path(source)
    return sha256_file(source / CATALOGUE if source.is_dir() else source)


def import_backup(source: str | Path, expected_sha256: str | None = None) -> list[tuple[str, str]]:
    """Restore every version of a backup; returns (tag, "imported" | "already present") pairs."""
    source = Path(source).absolute()
    if not source.exists():
        raise CTTError(f"{source}: no such backup file or folder")
    if expected_sha256 is not None:
        actual = backup_digest(source)
        if actual != expected_sha256.lower():
            raise CTTError(f"{source}: sha256 is {actual}, not the expected {expected_sha256}; refusing to import")
    with tempfile.TemporaryDirectory(prefix="ctt-import-") as scratch:
        folder = source
        if source.is_file():
            folder = Path(scratch) / "backup"
            folder.mkdir()
            _unpack(source, folder)
        entries = _read_catalogue(folder, source)
        for entry in entries:
            member = folder / entry["file"]
            if not member.is_file():
                raise CTTError(f"{source}: {entry['file']} is missing")
            if sha256_file(member) != entry["sha256"]:
                raise CTTError(f"{source}: {entry['file']} does not match the catalogue's sha256 (damaged or edited)")
        return [(entry["tag"], _import_one(folder / entry["file"], entry)) for entry in entries]


def _import_one(archive: Path, entry: dict) -> str:
    import bentoml
    from bentoml._internal.models.model import ModelStore

    name, _, version_name = entry["tag"].partition(":")
    with store_lock(name=name):
        existing = {v.tag: v for v in _versions_of(name)}
        if entry["tag"] in existing:
            present = existing[entry["tag"]]
            damage = version_problems(present.path)
            if present.digest != entry["manifest_sha256"] or damage:
                reason = damage[0] if damage else "its digest differs from the backup's"
                raise CTTError(f"{entry['tag']} is already in the store with different contents ({reason}); "
                               f"to restore the backup's copy, delete it first ('ctt models delete --force {entry['tag']}')")
            return "already present"
        if (models_dir() / name / version_name).exists():
            raise CTTError(f"{entry['tag']}: a damaged folder of that name is in the store; "
                           f"remove it first ('ctt models delete --force {entry['tag']}')")
        staging_dir().mkdir(parents=True, exist_ok=True)
        scratch = staging_dir() / staging_name(name, "import")
        try:
            imported = Path(bentoml.models.import_model(str(archive), _model_store=ModelStore(scratch)).path)
            if str(bentoml.models.get(entry["tag"], _model_store=ModelStore(scratch)).tag) != entry["tag"]:
                raise CTTError(f"{archive.name} holds another version than its catalogue entry {entry['tag']}")
            if verify_version(imported) != entry["manifest_sha256"]:
                raise CTTError(f"{entry['tag']}: the imported version differs from the one that was exported")
            fsync_tree(imported)
            checkpoint("import-verified")
            (models_dir() / name).mkdir(parents=True, exist_ok=True)
            os.rename(imported, models_dir() / name / version_name)
            fsync_path(models_dir() / name)
            _write_latest(name)
        except CTTError:
            raise
        except Exception as exc:  # BentoML's errors for an archive it cannot read
            raise CTTError(f"{archive.name}: BentoML could not import it ({exc})") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return "imported"
