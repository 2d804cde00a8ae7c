"""An import reads an archive from elsewhere under limits, and refuses what a ctt backup never
holds, before it unpacks more than the limits allow. Micro backbone, the tests' BentoML home."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from model import store
from tests.archives import backup_of, crafted_copy, pack_version, resign, sha256, write_backup
from tests.conftest import MONEY, SPORT, write_jsonl
from training.backup import DEFAULT_LIMITS
from training.cli import main
from training.learn import LearnSettings, learn

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctt: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """One learned version's folder (a copy), to pack into crafted archives."""
    name = f"ctt-limits-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("limits")
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    try:
        tag = learn("topic", write_jsonl(folder / "t.jsonl", [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY]),
                    settings=LearnSettings(backbone="micro", epochs=1, progress=False)).tag
        shutil.copytree(store.get_version(tag).path, folder / "copy")
        shutil.rmtree(store.models_dir() / name)
        yield {"name": name, "tag": tag, "folder": folder / "copy"}
    finally:
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous


@pytest.fixture
def empty(version, monkeypatch, tmp_path):
    """The version's model name with no version, and a TMPDIR of the test's own to watch."""
    monkeypatch.setenv("CTT_MODEL_NAME", version["name"])
    shutil.rmtree(store.models_dir() / version["name"], ignore_errors=True)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_a_compressed_backup_is_refused_before_it_is_expanded(capsys, version, empty, tmp_path):
    """4.5 MB of gzip inside a '.tar' expanded to 985 MiB in TMPDIR: now it is refused unread."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as archive:
        info = tarfile.TarInfo("ctt-backup.json")
        info.size = 64 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = tmp_path / "backup.tar"
    bomb.write_bytes(gzip.compress(inner.getvalue(), compresslevel=1))
    assert bomb.stat().st_size < 1 << 20
    code, _, err = run(capsys, "import", str(bomb))
    assert code == 2 and "gzip-compressed" in error_line(err)
    assert list(empty.iterdir()) == [] and store.list_versions() == []


def test_a_sparse_member_is_refused_at_once(version, empty, tmp_path):
    """A 10 KB tar holding a sparse 64 GiB file kept the import hashing for minutes."""
    if not shutil.which("tar"):
        pytest.skip("GNU tar makes the sparse archive")
    huge = tmp_path / "ctt-backup.json"
    with open(huge, "wb") as stream:
        stream.truncate(64 << 30)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(tmp_path), huge.name], check=True)
    assert archive.stat().st_size < 100_000
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "training.cli", "import", str(archive)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(empty)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "entry 'ctt-backup.json'" in result.stderr and time.monotonic() - started < 60
    assert list(empty.iterdir()) == []


def test_a_version_archive_that_expands_beyond_the_limit_is_refused(capsys, version, empty, tmp_path):
    big = crafted_copy(version["folder"], tmp_path, "bigversion00001")
    resign(big, edit_files=lambda folder: (folder / "eval_sets" / "9.jsonl").write_bytes(bytes(32 << 20)))
    archive = backup_of(tmp_path / "big.tar", [big])
    assert archive.stat().st_size < 1 << 20
    code, _, err = run(capsys, "import", str(archive), "--max-bytes", "8MiB")
    assert code == 2 and "more than 8388608 bytes in all (--max-bytes)" in error_line(err)
    code, _, err = run(capsys, "import", str(archive), "--max-member-bytes", "1MiB")
    assert code == 2 and "more than 1048576 (--max-member-bytes)" in error_line(err)
    code, _, err = run(capsys, "import", str(archive), "--max-members", "5")
    assert code == 2 and "more than 5 members in all (--max-members)" in error_line(err)
    assert list(empty.iterdir()) == [] and store.list_versions() == []
    assert not [p for p in store.staging_dir().iterdir() if p.name.startswith(f"{version['name']}@")]
    code, out, err = run(capsys, "import", str(archive))  # within the defaults it is an ordinary version
    assert code == 0 and out.strip() == f"imported: {version['name']}:bigversion00001", err
    assert DEFAULT_LIMITS.max_member_bytes >= 32 << 20


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("member, message", [
    (_member("./ctt.json", tarfile.SYMTYPE, link="/etc/passwd"), "is a link, a device or a sparse file"),
    (_member("./ctt.json", tarfile.LNKTYPE, link="model.yaml"), "is a link, a device or a sparse file"),
    (_member("./dev", tarfile.CHRTYPE), "is a link, a device or a sparse file"),
    (_member("./fifo", tarfile.FIFOTYPE), "is a link, a device or a sparse file"),
    (_member("../escaped"), "is not a plain relative path"),
    (_member("./eval_sets/../../escaped"), "is not a plain relative path"),
    (_member("/tmp/escaped"), "is not a plain relative path"),
    (_member("./a\nb"), "is not a plain relative path"),
    (_member("./model.yaml"), "appears twice"),
])
def test_a_version_archive_holding_anything_but_plain_files_is_refused(capsys, version, empty, tmp_path, member,
                                                                       message):
    plain = tmp_path / "v.tar"
    with tarfile.open(plain, "w") as archive:
        archive.add(version["folder"], arcname=".")
        archive.addfile(member[0], io.BytesIO(member[1]) if member[1] is not None else None)
    packed = tmp_path / "v.bentomodel"
    import lzma

    packed.write_bytes(lzma.compress(plain.read_bytes()))
    entry = {"tag": version["tag"], "parent": None, "lineage": [], "file": "v.bentomodel", "sha256": sha256(packed),
             "manifest_sha256": sha256(version["folder"] / "ctt-manifest.json")}
    backup = write_backup(tmp_path / "backup.tar", [entry], {"v.bentomodel": packed})
    code, _, err = run(capsys, "import", str(backup))
    assert code == 2 and message in error_line(err)
    assert not (tmp_path.parent / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert store.list_versions() == [] and list(empty.iterdir()) == []


@pytest.mark.parametrize("members, message", [
    ([_member("ctt-backup.json", data=b"{}"), _member("sub/x.bentomodel")], "unexpected entry 'sub/x.bentomodel'"),
    ([_member(".hidden")], "unexpected entry '.hidden'"),
    ([_member("link", tarfile.SYMTYPE, link="/etc")], "unexpected entry 'link'"),
])
def test_a_backup_holding_anything_but_flat_plain_files_is_refused(capsys, version, empty, tmp_path, members,
                                                                   message):
    code, _, err = run(capsys, "import", str(tar_of(tmp_path / "b.tar", members)))
    assert code == 2 and message in error_line(err)
    assert list(empty.iterdir()) == []


def test_a_catalogue_that_lies_about_lineage_or_names_is_refused(capsys, version, empty, tmp_path):
    packed = pack_version(version["folder"], tmp_path / "v.bentomodel")
    good = {"tag": version["tag"], "parent": None, "lineage": [], "file": "v.bentomodel", "sha256": sha256(packed),
            "manifest_sha256": sha256(version["folder"] / "ctt-manifest.json")}
    for change, message in [({"file": "../v.bentomodel"}, "is not an archive name"),
                            ({"lineage": ["ctt:../../x"]}, "lineage"),
                            ({"parent": f"{version['name']}:other0001", "lineage": [f"{version['name']}:other0001"]},
                             "its parent differs from the catalogue's"),
                            ({"lineage": [f"{version['name']}:other0001"]}, "does not start with its parent"),
                            ({"sha256": "x" * 64}, "is not a sha256 digest")]:
        backup = write_backup(tmp_path / f"{uuid.uuid4().hex[:6]}.tar", [{**good, **change}], {"v.bentomodel": packed})
        code, _, err = run(capsys, "import", str(backup))
        assert code == 2 and message in error_line(err), (change, err)
    assert store.list_versions() == []
