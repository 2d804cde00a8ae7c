"""Backup and restore: the drill an operator would run, and the ways a backup can be wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tarfile

import pytest
import torch

from model import store
from tests.conftest import MONEY, SPORT
from training.cli import main
from training.learn import learn


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot() -> dict:
    """What must survive a restore: lineage, records and every task's logits, per version."""
    texts = SPORT[:3] + MONEY[:3]
    result = {}
    for version in store.list_versions():
        model = version.load()
        result[version.tag] = {
            "parent": version.parent, "record": version.record(), "digest": version.digest,
            "logits": {task: model.logits(texts, [task] * len(texts)) for task in model.task_names},
        }
    return result


def wipe_store() -> None:
    shutil.rmtree(store.models_dir() / store.model_name())
    assert store.list_versions() == []


@pytest.fixture
def three_versions(empty_store, topic_files, question_files, micro_settings):
    learn("topic", *topic_files, settings=micro_settings(epochs=1))
    learn("question", *question_files, settings=micro_settings(epochs=1))
    learn("topic2", *topic_files, settings=micro_settings(epochs=1))
    return [v.tag for v in reversed(store.list_versions())]  # oldest first


def test_drill_export_all_wipe_import_gives_identical_versions(capsys, three_versions, tmp_path):
    before = snapshot()
    archive = tmp_path / "backup.tar"
    code, out, _ = run(capsys, "export", "--all", "--out", str(archive))
    assert code == 0
    digest, path = out.split()
    assert path == str(archive) and len(digest) == 64

    wipe_store()
    code, out, _ = run(capsys, "import", str(archive), "--sha256", digest)
    assert code == 0 and out.splitlines() == [f"imported: {tag}" for tag in three_versions]
    after = snapshot()
    assert after.keys() == before.keys()
    for tag in before:
        assert after[tag]["parent"] == before[tag]["parent"]
        assert after[tag]["record"] == before[tag]["record"]
        assert after[tag]["digest"] == before[tag]["digest"]
        for task, logits in before[tag]["logits"].items():
            assert torch.equal(after[tag]["logits"][task], logits)
    assert store.get_version().tag == three_versions[-1]
    assert run(capsys, "verify", "--all")[0] == 0
    # Importing again changes nothing.
    code, out, _ = run(capsys, "import", str(archive))
    assert code == 0 and all(line.startswith("already present") for line in out.splitlines())


def test_relative_paths_as_in_the_readme(capsys, three_versions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "export", "--all", "--out", "ctt-backup.tar")
    assert code == 0 and out.split()[1] == str(tmp_path / "ctt-backup.tar")
    wipe_store()
    assert run(capsys, "import", "ctt-backup.tar", "--sha256", out.split()[0])[0] == 0
    assert len(store.list_versions()) == 3


def test_folder_export_of_a_range_with_lineage(capsys, three_versions, tmp_path):
    first, second, third = three_versions
    code, _, err = run(capsys, "export", "--range", f"{third}..{first}", "--out", str(tmp_path / "r.tar"))
    assert code == 2 and f"{third} is not an ancestor of {first}" in err
    folder = tmp_path / "backup"
    code, out, _ = run(capsys, "export", "--range", f"{second}..{third}", "--out", str(folder))
    assert code == 0
    catalogue = json.loads((folder / "ctt-backup.json").read_text())
    assert [e["tag"] for e in catalogue["versions"]] == [second, third]
    assert catalogue["versions"][1]["lineage"] == [second, first]
    wipe_store()
    code, out, _ = run(capsys, "import", str(folder), "--sha256", out.split()[0])
    assert code == 0 and [v.tag for v in store.list_versions()] == [third, second]
    # The first version is not in this backup: the second still loads (it is self-contained).
    store.get_version(second).load()

    code, out, _ = run(capsys, "export", third, "--out", str(tmp_path / "one.tar"))
    assert code == 0
    with tarfile.open(tmp_path / "one.tar") as archive:
        assert sorted(archive.getnames()) == sorted(["ctt-backup.json", f"{third.replace(':', '-')}.bentomodel"])


def test_a_damaged_or_wrong_backup_is_refused(capsys, three_versions, tmp_path):
    archive = tmp_path / "backup.tar"
    code, out, _ = run(capsys, "export", "--all", "--out", str(archive))
    digest = out.split()[0]

    code, _, err = run(capsys, "export", "--all", "--out", str(archive))
    assert code == 2 and "already exists" in err

    wipe_store()
    code, _, err = run(capsys, "import", str(archive), "--sha256", "0" * 64)
    assert code == 2 and "refusing to import" in err and store.list_versions() == []

    # A member changed inside the archive, with no pinned digest: the catalogue catches it.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    member = next(unpacked.glob("*.bentomodel"))
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    code, _, err = run(capsys, "import", str(unpacked))
    assert code == 2 and "does not match the catalogue's sha256" in err and "Traceback" not in err
    assert store.list_versions() == []

    for bad, message in [(tmp_path / "missing.tar", "no such backup"), (tmp_path / "junk.tar", "not a readable backup")]:
        if "junk" in bad.name:
            bad.write_bytes(b"not a tar file at all")
        code, _, err = run(capsys, "import", str(bad))
        assert code == 2 and message in err and "Traceback" not in err

    # The same tag with other contents is never overwritten.
    code, _, _ = run(capsys, "import", str(archive), "--sha256", digest)
    assert code == 0
    version = store.get_version(three_versions[0])
    (version.path / "eval_sets" / "0.jsonl").write_text("{}\n")
    code, _, err = run(capsys, "import", str(archive))
    assert code == 2 and "different contents" in err and "eval_sets/0.jsonl" in err
    # ... until the damaged copy is deleted: then the backup restores it.
    assert run(capsys, "models", "delete", "--force", "--yes", three_versions[0])[0] == 0
    assert run(capsys, "import", str(archive))[0] == 0
    assert store.get_version(three_versions[0]).verify() == version.digest


def test_exporting_a_tampered_version_is_refused(capsys, three_versions, tmp_path):
    version = store.get_version(three_versions[1])
    (version.path / "ctt.json").write_text("{}")
    code, _, err = run(capsys, "export", "--all", "--out", str(tmp_path / "b.tar"))
    assert code == 2 and "ctt.json" in err and not (tmp_path / "b.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if "b.tar" in p.name] == []  # no partial backup left behind
    code, _, err = run(capsys, "export", "--out", str(tmp_path / "c.tar"))
    assert code == 2 and "name the versions to export" in err


@pytest.mark.parametrize("argv, message", [
    (["export", "--range", "nodots", "--out", "x.tar"], "use OLDER..NEWER"),
    (["export", "--all", "--out", "x.tar"], "no versions to export"),
    (["export", "--all", "--out", "no/such/folder/x.tar"], "is not a folder"),
    (["import", "."], "has no ctt-backup.json"),
    (["import", "x.tar", "--sha256", "0" * 64], "no such backup"),
    (["import", "x.tar", "--sha256", "abc"], "give the 64 hexadecimal digits"),
])
def test_operator_mistakes_with_backups_are_one_line(capsys, empty_store, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ctt: error:")]
    assert len(lines) == 1



def test_a_kill_during_import_leaves_no_partial_version(three_versions, tmp_path, capsys):
    archive = tmp_path / "backup.tar"
    run(capsys, "export", "--all", "--out", str(archive))
    wipe_store()
    pid = os.fork()
    if pid == 0:
        os.environ[store.KILL_HOOK_VARIABLE] = "import-verified"
        try:
            main(["import", str(archive)])
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert store.list_versions() == []
    code, out, _ = run(capsys, "verify")
    assert code == 1 and "leftover" in out
    run(capsys, "verify", "--repair", "--yes")
    assert run(capsys, "import", str(archive))[0] == 0 and len(store.list_versions()) == 3
