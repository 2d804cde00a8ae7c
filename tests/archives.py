"""Backups as another machine or an attacker could make them: a version folder changed and signed
again consistently (manifest and model.yaml digests agree, so only what ctt checks beyond the
version's own digests can refuse it), packed the way ``bentoml models export`` and ``ctt export``
pack them, with any catalogue."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Callable

from model.bentoml_internals import read_model_info
from model.integrity import MANIFEST_DIGEST_KEY, MODEL_YAML, write_manifest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resign(folder: Path, edit_yaml: Callable[[str], str] = lambda text: text,
           edit_files: Callable[[Path], None] = lambda folder: None) -> str:
    """Change a version folder and sign it again; returns its new manifest digest."""
    edit_files(folder)
    text = edit_yaml((folder / MODEL_YAML).read_text())
    old = re.search(rf"{MANIFEST_DIGEST_KEY}: ([0-9a-f]{{64}})", text).group(1)
    (folder / MODEL_YAML).write_text(text)
    with open(folder / MODEL_YAML, encoding="utf-8") as stream:
        digest = write_manifest(folder, read_model_info(stream))
    (folder / MODEL_YAML).write_text(text.replace(old, digest))
    return digest


def crafted_copy(source: Path, into: Path, version: str, *, creation_time: str | None = None,
                 backbone_spec: str | None = None) -> Path:
    """A copy of the version in ``source`` under another version id, re-dated or naming another
    backbone, signed consistently."""
    folder = into / version
    shutil.copytree(source, folder)

    def edit_yaml(text: str) -> str:
        text = re.sub(r"^version: .*$", f"version: {version}", text, count=1, flags=re.M)
        if creation_time:
            text = re.sub(r"^creation_time: .*$", f"creation_time: '{creation_time}'", text, count=1, flags=re.M)
        return text

    def edit_files(folder: Path) -> None:
        if backbone_spec is not None:
            config = json.loads((folder / "ctt.json").read_text())
            config["backbone"]["spec"] = backbone_spec
            (folder / "ctt.json").write_text(json.dumps(config))

    resign(folder, edit_yaml, edit_files)
    return folder


def manifest_digest(folder: Path) -> str:
    return sha256(folder / "ctt-manifest.json")


def pack_version(folder: Path, archive: Path) -> Path:
    """A ``.bentomodel`` as BentoML writes one: the folder as an xz-compressed tar."""
    made = shutil.make_archive(str(archive.with_suffix("")), "xztar", root_dir=folder)
    Path(made).rename(archive)
    return archive


def write_backup(path: Path, entries: list[dict], members: dict[str, Path]) -> Path:
    """A backup tar: ``ctt-backup.json`` with ``entries``, and ``members`` (archive name → file)."""
    work = path.parent / f"{path.name}.work"
    work.mkdir()
    (work / "ctt-backup.json").write_text(json.dumps({"format": 1, "versions": entries}))
    with tarfile.open(path, "w") as archive:
        archive.add(work / "ctt-backup.json", arcname="ctt-backup.json")
        for name, file in members.items():
            archive.add(file, arcname=name)
    shutil.rmtree(work)
    return path


def backup_of(path: Path, folders: list[Path], tags: list[str] | None = None, parents: list[str | None] | None = None,
              lineages: list[list[str]] | None = None) -> Path:
    """A backup of version folders, with a catalogue naming ``tags`` (default: their own)."""
    entries, members = [], {}
    for index, folder in enumerate(folders):
        with open(folder / MODEL_YAML, encoding="utf-8") as stream:
            info = read_model_info(stream)
        tag = tags[index] if tags else str(info.tag)
        parent = parents[index] if parents else info.metadata.get("parent")
        file_name = f"v{index}.bentomodel"
        archive = pack_version(folder, path.parent / f"{path.name}.{file_name}")
        members[file_name] = archive
        entries.append({"tag": tag, "parent": parent,
                        "lineage": lineages[index] if lineages else ([parent] if parent else []),
                        "manifest_sha256": manifest_digest(folder), "file": file_name, "sha256": sha256(archive)})
    return write_backup(path, entries, members)
