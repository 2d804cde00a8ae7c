"""Backup and restore of model versions: ``ctt export`` and ``ctt import``.

A backup is a catalogue (``ctt-backup.json``) plus one ``bentoml models export`` archive
(``.bentomodel``, an xz-compressed tar of the version's folder) per version. The catalogue lists
every version in registration order (parents first) with its parent, its lineage, its manifest
digest and the sha256 of its archive, so a restore can check each archive before reading it and
each imported version against the digest it had when exported. Written as a single ``.tar`` file,
the backup's own sha256 is printed on export and can be pinned on import (``--sha256``); written
as a folder, the catalogue's sha256 plays that part.

An import trusts nothing before it is checked, and reads everything under limits (``ImportLimits``:
total bytes, members, bytes per member, defined once here; ``ctt import`` flags override them):

- the backup must be the uncompressed tar ``ctt export`` writes (a compressed one is refused) of
  plain files; a version's archive is decompressed by this module, never by BentoML, into a
  staging folder, counting every byte against the same limits, refusing links, devices, sparse
  files, absolute or ``..`` paths and a header larger than ``MAX_HEADER_BYTES``;
- every tag in the catalogue and in a version is parsed strictly (``model/tags.py``): nothing in
  an archive names a path;
- a version lands only if its files match its own manifest, the manifest matches the catalogue,
  its parent matches the catalogue, and its backbone is one the project knows (or a local folder
  the operator allowed with ``--allow-backbone``): no archive makes a later command load a path or
  hub id the operator did not name;
- each version lands atomically under the store lock (``model.store.commit_version``), in the
  ledger by lineage (before the versions that descend from it, else newest), never by the clock
  written in the archive.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from model.errors import CTTError
from model.integrity import fsync_path, fsync_tree, sha256_file, verify_version, version_problems
from model.store import (
    Version, checkpoint, commit_version, get_version, list_versions, present_versions, read_version, staging_dir,
    staging_name, store_lock, version_dir,
)
from model.tags import exact_tag, shown

CATALOGUE = "ctt-backup.json"
BACKUP_FORMAT = 1
ARCHIVE_SUFFIX = ".bentomodel"
ARCHIVE_NAME = re.compile(r"[a-z0-9][-._a-z0-9]{0,200}\.bentomodel")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_CATALOGUE_BYTES = 16 << 20
MAX_HEADER_BYTES = 1 << 20  # a tar header (a long name, PAX records) is never larger
XZ_MEMORY_LIMIT = 256 << 20  # what the xz decoder may allocate (BentoML's archives need ~64 MiB)
_CHUNK = 1 << 20
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                     b"\x04\x22\x4d\x18": "lz4"}


@dataclass(frozen=True)
class ImportLimits:
    """What one ``ctt import`` may unpack, in all: every member of the backup and of each version's
    archive counts, decompressed. The defaults hold hundreds of MiniLM versions."""

    max_bytes: int = 1 << 30
    max_members: int = 20_000
    max_member_bytes: int = 256 << 20
    allowed_backbones: tuple[str, ...] = field(default=())  # local folders the operator allows


DEFAULT_LIMITS = ImportLimits()


def parse_size(text: str, option: str) -> int:
    """``1073741824``, ``512MiB``, ``2GiB``, ``64KiB``: a positive number of bytes."""
    match = re.fullmatch(r"([0-9]{1,15})\s*(|B|KiB|MiB|GiB|TiB)", text or "")
    if not match:
        raise CTTError(f"{option} {shown(text)}: give a size such as 512MiB, 2GiB or a number of bytes")
    value = int(match.group(1)) << {"": 0, "B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40}[match.group(2)]
    if value < 1:
        raise CTTError(f"{option} {shown(text)}: must be at least one byte")
    return value


class ImportRefused(CTTError):
    """The backup breaks a limit or a rule; nothing of it was imported past the version named."""


class _Budget:
    """The limits of one import, spent as members are read."""

    def __init__(self, limits: ImportLimits):
        self.limits, self.bytes, self.members = limits, 0, 0

    def member(self, where: str, name: str, size: int, counted: bool = False) -> None:
        """One more member of ``size`` bytes; ``counted`` when its bytes were spent already (a
        version's members come out of its decompressed stream, which is spent as it is read)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ImportRefused(f"{where}: more than {self.limits.max_members} members in all (--max-members)")
        if size > self.limits.max_member_bytes:
            raise ImportRefused(f"{where}: member {shown(name)} has {size} bytes, more than "
                                f"{self.limits.max_member_bytes} (--max-member-bytes)")
        if not counted:
            self.spend(where, size)

    def spend(self, where: str, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise ImportRefused(f"{where}: unpacks to more than {self.limits.max_bytes} bytes in all (--max-bytes)")


class _HeaderCap:
    """A file for ``tarfile`` that refuses any single read larger than a tar header can be: PAX and
    long-name headers are read whole, so a forged size would otherwise be read into memory."""

    def __init__(self, stream, where: str):
        self.stream, self.where = stream, where

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER_BYTES:
            raise ImportRefused(f"{self.where}: a tar header larger than {MAX_HEADER_BYTES} bytes")
        return self.stream.read(size)

    def seek(self, *args):
        return self.stream.seek(*args)

    def tell(self) -> int:
        return self.stream.tell()


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
    """Versions to export, in registration order: named ones, ``A..B`` (B and its ancestors back to
    A), or all."""
    if sum(bool(x) for x in (tags, range_spec is not None, everything)) != 1:
        raise CTTError("name the versions to export: TAG..., --range OLDER..NEWER, or --all")
    versions = list_versions()
    order = {v.tag: i for i, v in enumerate(reversed(versions))}
    by_tag = {v.tag: v for v in versions}
    if everything:
        chosen = versions
        if not chosen:
            raise CTTError("the model store has no versions to export")
    elif range_spec is not None:
        older_tag, separator, newer_tag = range_spec.partition("..")
        if not separator or not older_tag or not newer_tag:
            raise CTTError(f"--range {shown(range_spec)}: use OLDER..NEWER, e.g. ctt:abc..ctt:def")
        older, newer = get_version(older_tag, "--range OLDER"), get_version(newer_tag, "--range NEWER")
        chain = [newer.tag, *lineage(newer, by_tag)]
        if older.tag not in chain:
            raise CTTError(f"--range: {older.tag} is not an ancestor of {newer.tag}")
        chosen = [by_tag[t] for t in chain[: chain.index(older.tag) + 1]]
    else:
        chosen = list({v.tag: v for v in (get_version(t, "TAG") for t in tags)}.values())
    return sorted(chosen, key=lambda v: order[v.tag])


# ----- export --------------------------------------------------------------------------------
def check_destination(destination: str | Path) -> Path:
    """A backup never overwrites anything: a new .tar file, or a new or empty folder."""
    # Absolute: BentoML's exporter reads a relative path as one under the filesystem root.
    destination = Path(destination).absolute()
    as_tar = destination.suffix == ".tar"
    try:
        if destination.exists() and not (destination.is_dir() and not as_tar and not any(destination.iterdir())):
            raise CTTError(f"{destination} already exists; choose a new file or an empty folder")
        if not destination.parent.is_dir():
            raise CTTError(f"{destination.parent} is not a folder")
    except OSError as exc:
        raise CTTError(f"--out {shown(str(destination))}: {exc.strerror}") from None
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
            file_name = f"{version.tag.replace(':', '-')}{ARCHIVE_SUFFIX}"
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
    except OSError as exc:
        raise CTTError(f"could not write the backup {destination}: {exc.strerror}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----- reading a backup under limits ---------------------------------------------------------------
def _compression(path: Path) -> str | None:
    with open(path, "rb") as stream:
        start = stream.read(8)
    return next((kind for magic, kind in COMPRESSION_MAGIC.items() if start.startswith(magic)), None)


def _copy_member(source, destination: Path, size: int, where: str) -> str:
    """Copy one member's bytes into a new file (never through a link); returns their sha256."""
    digest = hashlib.sha256()
    try:
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise ImportRefused(f"{where}: member {shown(destination.name)} appears twice") from None
    with os.fdopen(descriptor, "wb") as out:
        copied = 0
        while chunk := source.read(min(_CHUNK, size - copied)):
            copied += len(chunk)
            digest.update(chunk)
            out.write(chunk)
        if copied != size:
            raise ImportRefused(f"{where}: member {shown(destination.name)} is cut short")
    return digest.hexdigest()


def _unpack_backup(source: Path, into: Path, budget: _Budget) -> dict[str, str]:
    """The backup tar's plain files, flat, into ``into``; returns each one's sha256."""
    compression = _compression(source)
    if compression:
        raise ImportRefused(f"{source}: is {compression}-compressed; ctt import reads the uncompressed .tar that "
                            "'ctt export' writes (decompress it first, minding its size)")
    digests = {}
    try:
        with open(source, "rb") as raw, tarfile.open(fileobj=_HeaderCap(raw, str(source)), mode="r:") as archive:
            for member in archive:
                name = member.name
                if not member.isreg() or member.issparse() or "/" in name or "\\" in name or name.startswith(".") \
                        or not name.isprintable():
                    raise ImportRefused(f"{source}: unexpected entry {shown(name)}; a ctt backup holds plain files only")
                budget.member(str(source), name, member.size)
                digests[name] = _copy_member(archive.extractfile(member), into / name, member.size, str(source))
    except tarfile.TarError as exc:
        raise CTTError(f"{source}: not a readable backup archive ({exc})") from None
    return digests


def _member_path(name: str, where: str) -> Path | None:
    """A version archive member's relative path, or None for the archive's root; refuses anything
    that could leave the folder it is unpacked into."""
    parts = name.split("/")
    while parts and parts[0] == ".":
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if not parts:
        return None
    if name.startswith("/") or any(p in ("", ".", "..") or len(p) > 255 or not p.isprintable() or "\\" in p
                                   for p in parts):
        raise ImportRefused(f"{where}: member {shown(name)} is not a plain relative path")
    return Path(*parts)


def _unpack_version(archive: Path, into: Path, budget: _Budget, scratch: Path) -> None:
    """A ``.bentomodel`` (xz-compressed tar) into ``into``: decompressed under the limits, plain
    files and folders only."""
    where = archive.name
    if _compression(archive) != "xz":
        raise ImportRefused(f"{where}: not an xz-compressed version archive")
    plain = scratch / f"{archive.name}.tar"
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
    try:
        with open(archive, "rb") as source, open(plain, "wb") as out:
            data = b""
            while not decoder.eof:
                if decoder.needs_input:
                    data = source.read(_CHUNK)
                    if not data:
                        raise ImportRefused(f"{where}: the compressed archive is cut short")
                chunk = decoder.decompress(data, max_length=_CHUNK)
                data = b""
                budget.spend(where, len(chunk))
                out.write(chunk)
    except lzma.LZMAError as exc:
        raise ImportRefused(f"{where}: not a readable version archive ({exc})") from None
    into.mkdir()
    try:
        with open(plain, "rb") as raw, tarfile.open(fileobj=_HeaderCap(raw, where), mode="r:") as members:
            for member in members:
                relative = _member_path(member.name, where)
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise ImportRefused(f"{where}: member {shown(member.name)} is a link, a device or a sparse "
                                        "file; a version holds plain files only")
                budget.member(where, member.name, member.size if member.isreg() else 0, counted=True)
                if relative is None:
                    continue
                target = into / relative
                for parent in reversed(target.parents):
                    if parent != into and into in parent.parents and not parent.exists():
                        parent.mkdir()
                if member.isdir():
                    target.mkdir(exist_ok=True)
                else:
                    _copy_member(members.extractfile(member), target, member.size, where)
    except tarfile.TarError as exc:
        raise ImportRefused(f"{where}: not a readable version archive ({exc})") from None
    finally:
        plain.unlink(missing_ok=True)


# ----- the catalogue ---------------------------------------------------------------------------
def _read_catalogue(folder: Path, source: Path) -> list[dict]:
    path = folder / CATALOGUE
    if not path.is_file():
        raise CTTError(f"{source}: has no {CATALOGUE}; not a ctt backup")
    if path.stat().st_size > MAX_CATALOGUE_BYTES:
        raise ImportRefused(f"{source}: {CATALOGUE} is larger than {MAX_CATALOGUE_BYTES} bytes")
    try:
        catalogue = json.loads(path.read_text(encoding="utf-8"))
        entries = catalogue["versions"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CTTError(f"{source}: {CATALOGUE} is not a valid catalogue") from None
    if catalogue.get("format") != BACKUP_FORMAT:
        raise CTTError(f"{source}: backup format {shown(catalogue.get('format'))} is not supported")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{source}: {CATALOGUE} entry {index + 1}"
        exact_tag(entry.get("tag"), f"{where}: tag")
        if entry["tag"] in seen:
            raise ImportRefused(f"{where}: tag {entry['tag']} appears twice")
        seen.add(entry["tag"])
        if entry.get("parent") is not None:
            exact_tag(entry["parent"], f"{where}: parent")
        if not isinstance(entry.get("lineage", []), list):
            raise ImportRefused(f"{where}: lineage is not a list of tags")
        for ancestor in entry.get("lineage", []):
            exact_tag(ancestor, f"{where}: lineage")
        if (entry.get("lineage") or [None])[0] != entry.get("parent"):
            raise ImportRefused(f"{where}: its lineage does not start with its parent")
        file_name = entry.get("file")
        if not isinstance(file_name, str) or not ARCHIVE_NAME.fullmatch(file_name) or ".." in file_name:
            raise ImportRefused(f"{where}: file {shown(file_name)} is not an archive name of this backup")
        for key in ("sha256", "manifest_sha256"):
            if not isinstance(entry.get(key), str) or not SHA256.fullmatch(entry[key]):
                raise ImportRefused(f"{where}: {key} is not a sha256 digest")
    return entries


def backup_digest(source: str | Path) -> str:
    source = Path(source)
    return sha256_file(source / CATALOGUE if source.is_dir() else source)


def check_sha256(text: str | None) -> str | None:
    if text is not None and not SHA256.fullmatch(text.lower()):
        raise CTTError(f"--sha256 {shown(text)}: give the 64 hexadecimal digits 'ctt export' printed")
    return None if text is None else text.lower()


def import_backup(source: str | Path, expected_sha256: str | None = None,
                  limits: ImportLimits = DEFAULT_LIMITS) -> list[tuple[str, str]]:
    """Restore every version of a backup; returns (tag, "imported" | "already present") pairs."""
    expected_sha256 = check_sha256(expected_sha256)
    source = Path(source).absolute()
    if not source.exists():
        raise CTTError(f"{source}: no such backup file or folder")
    if source.is_file() and source.stat().st_size > limits.max_bytes:
        raise ImportRefused(f"{source}: has {source.stat().st_size} bytes, more than {limits.max_bytes} (--max-bytes)")
    if expected_sha256 is not None:
        actual = backup_digest(source)
        if actual != expected_sha256:
            raise CTTError(f"{source}: sha256 is {actual}, not the expected {expected_sha256}; refusing to import")
    budget = _Budget(limits)
    with tempfile.TemporaryDirectory(prefix="ctt-import-") as scratch:
        folder = source
        digests: dict[str, str] = {}
        if source.is_file():
            folder = Path(scratch) / "backup"
            folder.mkdir()
            digests = _unpack_backup(source, folder, budget)
        entries = _read_catalogue(folder, source)
        for entry in entries:
            member = folder / entry["file"]
            if member.is_symlink() or not member.is_file():
                raise CTTError(f"{source}: {entry['file']} is missing")
            if source.is_dir():
                budget.member(str(source), entry["file"], member.stat().st_size)
            actual = digests.get(entry["file"]) if digests else sha256_file(member)
            if actual != entry["sha256"]:
                raise CTTError(f"{source}: {entry['file']} does not match the catalogue's sha256 (damaged or edited)")
        return [(entry["tag"], _import_one(folder / entry["file"], entry, budget, Path(scratch), limits))
                for entry in entries]


def backbone_problem(folder: Path, allowed_folders: tuple[str, ...]) -> str | None:
    """Why the version in ``folder`` may not land: a backbone the project does not know, or a
    digest other than the published one; None when it may."""
    from model.registry import KNOWN_BACKBONES, read_config

    backbone = read_config(folder).get("backbone")
    spec = backbone.get("spec") if isinstance(backbone, dict) else None
    if not isinstance(spec, str):
        return "records no backbone"
    if spec == "minilm":
        from model.backbone import MINILM_PINNED_SHA256

        if backbone.get("digest") != MINILM_PINNED_SHA256["model.safetensors"]:
            return "records a MiniLM backbone whose digest is not the published one"
    allowed = {os.path.normpath(str(Path(f).absolute())) for f in allowed_folders} | \
        {str(Path(f).resolve()) for f in allowed_folders}
    if spec in KNOWN_BACKBONES or (os.path.isabs(spec) and os.path.normpath(spec) in allowed):
        return None
    return (f"names the backbone {shown(spec)}, which is not one the project knows ({', '.join(KNOWN_BACKBONES)}); "
            "if it is a local model folder you trust, allow it with --allow-backbone FOLDER")


def _import_one(archive: Path, entry: dict, budget: _Budget, scratch: Path, limits: ImportLimits) -> str:
    ref = exact_tag(entry["tag"])
    name = ref.name
    with store_lock(name=name):
        present = present_versions(name)
        registered = {v.tag: v for v in list_versions(name)}
        if entry["tag"] in present:
            existing = present[entry["tag"]]
            damage = version_problems(existing.path)
            if existing.digest != entry["manifest_sha256"] or damage:
                reason = damage[0] if damage else "its digest differs from the backup's"
                raise CTTError(f"{entry['tag']} is already in the store with different contents ({reason}); to "
                               "restore the backup's copy, delete the store's copy first ('ctt models delete')")
            if entry["tag"] in registered:
                return "already present"
            # The same version, put there around ctt: registering it is all that is missing.
        elif os.path.lexists(existing_folder := version_dir(name, ref.version)):
            raise CTTError(f"{entry['tag']}: a damaged folder of that name is in the store ({existing_folder}); "
                           "remove it first ('ctt models delete --force')")
        staging_dir().mkdir(parents=True, exist_ok=True)
        work = staging_dir() / staging_name(name, "import")
        try:
            work.mkdir()
            version_folder = work / "version"
            _unpack_version(archive, version_folder, budget, scratch)
            imported = read_version(version_folder)
            if imported is None or imported.tag != entry["tag"]:
                raise ImportRefused(f"{archive.name} holds another version than its catalogue entry {entry['tag']}")
            if verify_version(version_folder) != entry["manifest_sha256"]:
                raise CTTError(f"{entry['tag']}: the imported version differs from the one that was exported")
            if imported.parent != entry.get("parent"):
                raise ImportRefused(f"{entry['tag']}: its parent differs from the catalogue's")
            problem = backbone_problem(version_folder, limits.allowed_backbones)
            if problem:
                raise ImportRefused(f"{entry['tag']} {problem}")
            if entry["tag"] in present:  # identical, checked above: only the ledger entry is missing
                shutil.rmtree(work)
                staged = None
            else:
                staged = work.with_name(staging_name(name, "importing"))
                fsync_tree(version_folder)
                os.rename(version_folder, staged)
                shutil.rmtree(work)
            checkpoint("import-verified")
            interrupted = commit_version(staged, entry["tag"], entry["manifest_sha256"], entry.get("parent"),
                                         list(entry.get("lineage") or []), "imported")
            if interrupted:
                raise KeyboardInterrupt(f"interrupted; {entry['tag']} had already been imported and is complete")
        except OSError as exc:
            raise CTTError(f"could not import {entry['tag']}: {exc.strerror}; it was not imported") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return "imported"

