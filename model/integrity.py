"""What makes a model version trustworthy on disk: durable writes and a digest of every file.

Each version folder holds ``ctt-manifest.json``: the sha256 and size of every other file in the
folder, plus the digest of the version's BentoML ``model.yaml`` (its tag, creation time, labels and
metadata, without the manifest's own digest). ``model.yaml`` in turn carries the manifest's sha256
in its metadata (``manifest_sha256``). So

- a changed, truncated, missing or added data file disagrees with the manifest;
- an edited manifest disagrees with the digest in ``model.yaml``;
- an edited ``model.yaml`` (lineage, metrics, labels, creation time) disagrees with the manifest.

Someone who rewrites all of them consistently is caught only by a digest kept elsewhere: the
manifest digest recorded by the child versions (``parent_manifest_sha256``), by a stage approval
(``ctt stage``), or by a backup catalogue and its pinned archive digest (``ctt export``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from model.errors import CTTError

MANIFEST_FILE = "ctt-manifest.json"
MODEL_YAML = "model.yaml"  # BentoML's description of a model version
MANIFEST_DIGEST_KEY = "manifest_sha256"  # in model.yaml's metadata
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


# ----- durability --------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a directory's fsync makes renames durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    for directory, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def prepare_replacement(path: Path, text: str) -> Path:
    """Write ``text`` beside ``path`` in a temporary file, flushed to disk, for ``os.replace`` to
    swap in later: every byte a replacement needs is written before anything changes, so the swap
    itself needs no space. Nothing is left behind when writing fails."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never a mix."""
    temporary = prepare_replacement(path, text)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


# ----- digests -----------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file below ``folder`` as a POSIX relative path, except the two that describe it."""
    found = []
    for directory, folders, files in os.walk(folder):
        for name in files + [f for f in folders if (Path(directory) / f).is_symlink()]:
            relative = (Path(directory) / name).relative_to(folder).as_posix()
            if relative not in (MANIFEST_FILE, MODEL_YAML):
                found.append(relative)
    return sorted(found)


def _read_info(folder: Path):
    from model.bentoml_internals import read_model_info

    try:
        with open(folder / MODEL_YAML, encoding="utf-8") as stream:
            return read_model_info(stream)
    except FileNotFoundError:
        raise CTTError(f"{folder}: {MODEL_YAML} is missing") from None
    except Exception as exc:  # BentoML raises its own exception types for malformed files
        raise CTTError(f"{folder}: {MODEL_YAML} is unreadable or was edited: {exc}") from None


def info_digest(info) -> str:
    """The digest of what ``model.yaml`` says about a version, its manifest digest left out."""
    metadata = {k: v for k, v in dict(info.metadata).items() if k != MANIFEST_DIGEST_KEY}
    document = {
        "name": info.tag.name, "version": info.tag.version, "module": info.module,
        "labels": dict(info.labels), "metadata": metadata, "creation_time": info.creation_time.isoformat(),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(folder: Path, info) -> str:
    """Hash every file of a staged version into its manifest; returns the manifest's sha256."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "tag": str(info.tag),
        "model_yaml_sha256": info_digest(info),
        "files": {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in _files(folder)},
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def verify_version(folder: str | Path) -> str:
    """Check a version folder against its manifest without loading the model; returns its digest.

    Raises CTTError naming the first file that does not match. This is the function a server
    calls on a version folder before loading it.
    """
    problems = version_problems(folder)
    if problems:
        raise CTTError(problems[0])
    return manifest_digest(Path(folder))


def manifest_digest(folder: Path) -> str:
    return sha256_file(folder / MANIFEST_FILE)


def version_problems(folder: str | Path) -> list[str]:
    """Every way in which a version folder differs from what it recorded, one line each."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return [f"{folder}: not a model version folder"]
    for name in (MODEL_YAML, MANIFEST_FILE):
        if (folder / name).is_symlink():
            return [f"{folder}: {name} is a link; a version holds regular files only"]
    try:
        info = _read_info(folder)
    except CTTError as exc:
        return [str(exc)]
    tag = str(info.tag)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{tag}: {MANIFEST_FILE} is missing (registered before versions were hashed, or removed): "
                "the version cannot be trusted; restore it from a backup or learn it again"]
    recorded = info.metadata.get(MANIFEST_DIGEST_KEY)
    if sha256_file(manifest_path) != recorded:
        return [f"{tag}: {MANIFEST_FILE} does not match the digest recorded in {MODEL_YAML} (edited or damaged)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected_files = manifest["files"]
        expected_info = manifest["model_yaml_sha256"]
    except (ValueError, KeyError, TypeError):
        return [f"{tag}: {MANIFEST_FILE} is not a valid manifest"]
    problems = []
    if manifest.get("tag") != tag or info_digest(info) != expected_info:
        problems.append(f"{tag}: {MODEL_YAML} was edited after registration (its digest differs from the manifest's)")
    present = set(_files(folder))
    for name in sorted(set(expected_files) - present):
        problems.append(f"{tag}: {name} is missing")
    for name in sorted(present - set(expected_files)):
        problems.append(f"{tag}: {name} was added after registration")
    for name in sorted(set(expected_files) & present):
        expected = expected_files[name]
        if not stat.S_ISREG((folder / name).lstat().st_mode):
            # A link could make a reader open a file outside the version: never followed.
            problems.append(f"{tag}: {name} is not a regular file (a link or a special file)")
            continue
        size = (folder / name).stat().st_size
        if size != expected.get("bytes"):
            problems.append(f"{tag}: {name} has {size} bytes, {expected.get('bytes')} were recorded (truncated or changed)")
        elif sha256_file(folder / name) != expected.get("sha256"):
            problems.append(f"{tag}: {name} does not match its recorded sha256 (changed or damaged)")
    return problems
