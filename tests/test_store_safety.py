"""Nothing an operator types or imports destroys a model: each case below once did (issue 19's
"tried on main" list), in a real store in the tests' BentoML home, micro backbone."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import bentoml
import pytest

from model import store
from model.store.ledger import ledger_path
from tests.archives import backup_of, crafted_copy
from tests.conftest import MONEY, QUESTION, SPORT, STATEMENT, write_jsonl
from training.cli import main
from training.learn import LearnSettings, learn

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctt: error:") and "Traceback" not in err, err
    return lines[0]


def home() -> Path:
    return store.models_dir().resolve().parent


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``roots`` with its size and modification time."""
    seen = {}
    for root in roots:
        for directory, folders, files in os.walk(root):
            for name in folders + files:
                path = Path(directory) / name
                info = path.lstat()
                seen[str(path)] = (info.st_size, info.st_mtime_ns)
    return seen


def reset(name: str) -> None:
    """An empty store for ``name``: no versions, ledger, stages, history of it, or leftovers."""
    shutil.rmtree(store.models_dir() / name, ignore_errors=True)
    for folder in (store.state_dir(), store.staging_dir()):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(f"{name}.") or path.name.startswith(f"{name}@"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """Two versions learned once (B child of A) and their backup; each test restores it."""
    name = f"ctt-safety-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("safety")
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    try:
        settings = LearnSettings(backbone="micro", epochs=1, progress=False)
        a = learn("topic", write_jsonl(folder / "t.jsonl", [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY]),
                  settings=settings).tag
        b = learn("question", write_jsonl(folder / "q.jsonl", [(t, "q") for t in QUESTION] + [(t, "s") for t in STATEMENT]),
                  settings=settings).tag
        assert main(["export", "--all", "--out", str(folder / "backup.tar")]) == 0
        copies = folder / "copies"
        for tag in (a, b):
            shutil.copytree(store.get_version(tag).path, copies / tag.split(":")[1])
        yield {"name": name, "a": a, "b": b, "backup": folder / "backup.tar", "copies": copies,
               "train": folder / "q.jsonl"}
    finally:
        reset(name)
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous


@pytest.fixture
def restored(lineage, monkeypatch, capsys):
    monkeypatch.setenv("CTT_MODEL_NAME", lineage["name"])
    reset(lineage["name"])
    assert main(["import", str(lineage["backup"])]) == 0
    capsys.readouterr()
    assert [v.tag for v in store.list_versions()] == [lineage["b"], lineage["a"]]
    return lineage


def newest_everywhere() -> set[str]:
    """What each reader takes for the newest version: ctt models, get_version, BentoML's latest."""
    listed = store.list_versions()[0].tag
    latest = str(bentoml.models.get(f"{store.model_name()}:latest").tag)
    return {listed, store.get_version().tag, latest}


# ----- tags ------------------------------------------------------------------------------------
def test_an_empty_or_nameless_tag_is_refused_never_taken_for_the_newest(capsys, restored):
    name = restored["name"]
    before = snapshot(home())
    for argv in (["models", "delete", ""], ["models", "delete", "--yes", ""], ["models", "delete", "--yes", f"{name}:"],
                 ["models", "delete", "--yes", "--force", f"{name}:"], ["stage", "set", "", "production"],
                 ["stage", "set", f"{name}:", "production"], ["verify", ""], ["predict", "--task", "topic",
                 "--text", "goal", "--model", ""], ["export", "", "--out", "x.tar"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert "is empty" in one_error_line(err) or "has no version after ':'" in err, argv
    assert [v.tag for v in store.list_versions()] == [restored["b"], restored["a"]]
    assert store.read_stages()["stages"] == {}
    assert snapshot(home()) == before


def test_a_tag_that_climbs_out_of_the_store_is_refused_and_repair_keeps_every_version(capsys, restored, tmp_path):
    name = restored["name"]
    assert run(capsys, "stage", "set", restored["a"], "production")[0] == 0
    before = snapshot(home())
    for tag in (f"{name}:../../models", "../../models", f"{name}:..", f"{name}:a/b", f"/{name}:x", f"{name}:x\x00"):
        code, _, err = run(capsys, "models", "delete", "--force", "--yes", tag)
        assert code == 2 and "Traceback" not in err, tag
        one_error_line(err)
    assert snapshot(home()) == before
    code, _, err = run(capsys, "verify", "--repair", "--yes")
    assert code == 0, err
    assert [v.tag for v in store.list_versions()] == [restored["b"], restored["a"]]
    assert store.stage_version("production").tag == restored["a"]


def test_a_catalogue_tag_with_a_path_is_refused_before_anything_is_created(capsys, restored, tmp_path):
    name = restored["name"]
    copy = restored["copies"] / restored["a"].split(":")[1]
    outside = home().parent / f"escaped-{uuid.uuid4().hex[:6]}"
    for tag in (f"{name}:../../../{outside.name}", f"../../../../{tmp_path.name}/x/y:abc", f"{name}:latest",
                f"{name.upper()}:abc", "ctt:a\nb"):
        archive = backup_of(tmp_path / f"{uuid.uuid4().hex[:6]}.tar", [copy], tags=[tag], parents=[None])
        before = snapshot(home(), tmp_path)
        code, _, err = run(capsys, "import", str(archive))
        line = one_error_line(err)
        assert code == 2 and "ctt models delete" not in line and "tag" in line, (tag, line)
        assert snapshot(home(), tmp_path) == before, tag  # no lock, no folder, nothing
    assert not outside.exists() and not (tmp_path / "x").exists()
    # An archive whose catalogue says one version and whose files hold another is refused too.
    archive = backup_of(tmp_path / "swapped.tar", [copy], tags=[f"{name}:swapped0"], parents=[None])
    code, _, err = run(capsys, "import", str(archive))
    assert code == 2 and "holds another version" in one_error_line(err)


# ----- one notion of newest --------------------------------------------------------------------
def test_a_future_dated_import_is_newest_only_until_the_next_version(capsys, restored, tmp_path):
    """A version another machine's clock (or a crafted archive) dated 2099: it lands as the newest
    (imported last), and the next ctt learn takes it as parent and is newest after it, for ctt,
    BentoML's latest and bentoml serve alike."""
    name = restored["name"]
    future = crafted_copy(restored["copies"] / restored["a"].split(":")[1], tmp_path, "future000000abcd",
                          creation_time="2099-01-01T00:00:00+00:00")
    code, out, err = run(capsys, "import", str(backup_of(tmp_path / "future.tar", [future])))
    assert code == 0, err
    future_tag = f"{name}:future000000abcd"
    assert store.get_version(future_tag).created.startswith("2099")
    assert newest_everywhere() == {future_tag}
    code, out, err = run(capsys, "learn", "--task", "q", "--train", str(restored["train"]), "--backbone", "micro",
                         "--epochs", "1", "--quiet")
    assert code == 0, err
    learned = out.strip()
    assert store.get_version(learned).parent == future_tag
    assert newest_everywhere() == {learned}
    assert run(capsys, "predict", "--task", "q", "--text", "is it raining?")[0] == 0
    assert run(capsys, "models")[1].splitlines()[1].startswith(learned)
    assert run(capsys, "verify", "--all")[0] == 0


def test_an_imported_ancestor_goes_before_its_descendants(capsys, restored):
    a, b = restored["a"], restored["b"]
    assert run(capsys, "models", "delete", "--force", "--yes", a)[0] == 0
    assert run(capsys, "import", str(restored["backup"]))[0] == 0
    assert [v.tag for v in store.list_versions()] == [b, a] and newest_everywhere() == {b}


def test_what_bentoml_models_import_and_delete_leave_is_reported_and_ignored(capsys, restored, tmp_path):
    a, b = restored["a"], restored["b"]
    exported = tmp_path / "b.bentomodel"
    bentoml.models.export_model(b, str(exported))
    assert run(capsys, "models", "delete", "--yes", b)[0] == 0
    bentoml.models.import_model(str(exported))  # around ctt: no ledger entry
    bentoml.models.delete(a)  # around ctt: a registered version vanishes
    assert store.list_versions() == []
    code, out, _ = run(capsys, "verify")
    assert code == 1
    assert f"{b}: in the store, but ctt never registered it" in out
    assert f"{a}: registered, but missing from the store" in out
    code, _, err = run(capsys, "predict", "--task", "topic", "--text", "goal", "--model", b)
    assert code == 2 and "ctt never registered it" in one_error_line(err)
    code, _, err = run(capsys, "verify", "--repair")
    assert code == 1 and f"would forget {a}" in err and "nothing was changed" in err
    code, _, err = run(capsys, "verify", "--repair", "--yes")
    assert f"forgot {a}" in err
    # ctt import registers the identical version BentoML put there.
    code, out, err = run(capsys, "import", str(restored["backup"]))
    assert code == 0 and out.splitlines() == [f"imported: {a}", f"imported: {b}"], err
    assert [v.tag for v in store.list_versions()] == [b, a] and run(capsys, "verify", "--all")[0] == 0
    actions = [entry["action"] for entry in store.read_history() if entry.get("model") == restored["name"]]
    assert actions[-2:] == ["delete", "repair"]


def test_delete_and_repair_say_what_they_would_do_and_act_only_with_yes(capsys, restored):
    a, b = restored["a"], restored["b"]
    code, out, err = run(capsys, "models", "delete", b)
    assert code == 0 and out.startswith(f"would delete {b} (registered, ") and "--yes" in err
    assert run(capsys, "models", "delete", b[:-3])[2].count("did you mean") == 1  # a prefix is never enough
    leftover = store.staging_dir() / f"{restored['name']}@abandoned"
    leftover.mkdir(parents=True)
    code, _, err = run(capsys, "verify", "--repair")
    assert f"would remove {leftover}" in err and leftover.exists()
    assert [v.tag for v in store.list_versions()] == [b, a]
    code, out, _ = run(capsys, "models", "delete", "--yes", b)
    assert code == 0 and out.strip() == f"deleted {b}"
    record = [e for e in store.read_history() if e["action"] == "delete" and e["tag"] == b][-1]
    assert record["by"] and record["at"] and record["files"] > 0


def test_repair_puts_back_a_registered_version_a_killed_deletion_left_in_staging(capsys, restored):
    """A deletion killed between moving the version out and updating the ledger: the leftover is a
    complete, registered version, which repair restores in its place instead of removing it."""
    a, b = restored["a"], restored["b"]
    assert run(capsys, "stage", "set", a, "production")[0] == 0
    leftover = store.staging_dir() / f"{restored['name']}@deleted-12345678"
    os.rename(store.get_version(a).path, leftover)
    assert [v.tag for v in store.list_versions()] == [b]
    code, out, _ = run(capsys, "verify")
    assert code == 1 and f"leftover of an interrupted run: {leftover}; 'ctt verify --repair' puts it back" in out
    code, _, err = run(capsys, "verify", "--repair", "--yes")
    assert code == 0 and f"put {a} back into the store" in err, err
    assert [v.tag for v in store.list_versions()] == [b, a] and newest_everywhere() == {b}
    assert store.stage_version("production").tag == a and not leftover.exists()


# ----- failures while writing ------------------------------------------------------------------
WRITE_STEPS = ["staging-created", "files-written", "manifest-written", "synced", "prepared", "ledger-written",
               "renamed", "latest-written"]


@pytest.mark.parametrize("error", ["ENOSPC", "EIO", "EACCES"])
def test_a_registration_that_fails_to_write_at_any_step_leaves_the_store_as_it_was(restored, monkeypatch, error):
    parent = store.get_version()
    model = parent.load()
    name = restored["name"]

    def state():
        latest = (store.models_dir() / name / "latest").read_text()
        return ([v.tag for v in store.list_versions()], latest, ledger_path(name).read_text(),
                sorted(p.name for p in store.staging_dir().iterdir() if p.name.startswith(f"{name}@")),
                sorted(p.name for p in (store.models_dir() / name).iterdir()),
                sorted(p.name for p in store.state_dir().iterdir() if p.name.startswith(f".{name}")))

    before = state()
    for step in WRITE_STEPS:
        monkeypatch.setenv(store.KILL_HOOK_VARIABLE, f"{step}:{error}")
        with pytest.raises(store.StoreWriteFailed, match=f"{os.strerror(getattr(errno, error))}.*nothing was registered"):
            store.register_version(model, eval_sets=[parent.eval_set(0), parent.eval_set(1)],
                                   metadata={"parent": parent.tag}, labels={"stage": "development"})
        assert state() == before, step
    monkeypatch.delenv(store.KILL_HOOK_VARIABLE)
    retried = store.register_version(model, eval_sets=[parent.eval_set(0), parent.eval_set(1)],
                                     metadata={"parent": parent.tag}, labels={"stage": "development"})
    assert [v.tag for v in store.list_versions()] == [retried.tag, *before[0]]  # one new version, no duplicate
    assert newest_everywhere() == {retried.tag} and store.store_problems() == []


def test_a_learn_that_fails_to_write_exits_1_with_one_line(capsys, restored, monkeypatch):
    monkeypatch.setenv(store.KILL_HOOK_VARIABLE, "renamed:ENOSPC")
    code, out, err = run(capsys, "learn", "--task", "q", "--train", str(restored["train"]), "--epochs", "1", "--quiet")
    line = one_error_line(err)
    assert code == 1 and out == "" and "No space left on device" in line and "nothing was registered" in line
    assert [v.tag for v in store.list_versions()] == [restored["b"], restored["a"]]
    assert store.store_problems() == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_at_any_point_registers_nothing_and_a_retry_registers_once(restored, monkeypatch, tmp_path):
    """Registrations into a store on a 3 MiB tmpfs left with less space than a version takes, 4 KiB
    more each time: each runs out at another step, and each leaves the store exactly as it was."""
    mount = tmp_path / "home"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        parent = store.get_version(restored["b"])
        model = parent.load()
        (mount / "models").mkdir()
        monkeypatch.setattr("model.bentoml_internals.model_store_dir", lambda: mount / "models")  # the tmpfs store

        def register():
            return store.register_version(model, eval_sets=[parent.eval_set(0), parent.eval_set(1)],
                                          metadata={"parent": parent.tag}, labels={"stage": "development"})

        def state():
            return sorted((str(p.relative_to(mount)), p.read_bytes() if p.is_file() else None)
                          for p in mount.rglob("*") if p.name != "filler")

        def free() -> int:
            return os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize

        space = free()
        first = register()
        needed_kib = (space - free()) // 1024
        before = state()
        assert needed_kib >= 12
        for free_kib in range(0, needed_kib, 4):
            filler = mount / "filler"
            filler.unlink(missing_ok=True)
            filler.write_bytes(b"\0" * (free() - free_kib * 1024))
            with pytest.raises(store.StoreWriteFailed, match="No space left on device.*nothing was registered"):
                register()
            assert state() == before, free_kib
        (mount / "filler").unlink()
        retried = register()
        assert [v.tag for v in store.list_versions()] == [retried.tag, first.tag]
        assert (mount / "models" / restored["name"] / "latest").read_text() == retried.version
        assert store.store_problems() == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ----- backbones ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["/srv/models/bert", "~/models/bert", "sentence-transformers/all-MiniLM-L6-v2",
                                  "models/bert"])
def test_an_imported_version_never_names_a_backbone_the_operator_did_not_allow(capsys, restored, tmp_path, spec):
    name = restored["name"]
    crafted = crafted_copy(restored["copies"] / restored["a"].split(":")[1], tmp_path, "otherbackbone01",
                           backbone_spec=spec)
    archive = backup_of(tmp_path / "b.tar", [crafted])
    code, _, err = run(capsys, "import", str(archive))
    assert code == 2 and "--allow-backbone" in one_error_line(err)
    assert f"{name}:otherbackbone01" not in {v.tag for v in store.present_versions().values()}


def test_a_local_backbone_folder_the_operator_allows_is_accepted(capsys, restored, tmp_path):
    allowed = tmp_path / "bert"
    allowed.mkdir()
    crafted = crafted_copy(restored["copies"] / restored["a"].split(":")[1], tmp_path, "localbackbone01",
                           backbone_spec=str(allowed.resolve()))
    archive = backup_of(tmp_path / "b.tar", [crafted])
    assert run(capsys, "import", str(archive))[0] == 2
    code, out, err = run(capsys, "import", str(archive), "--allow-backbone", str(allowed))
    assert code == 0 and out.strip() == f"imported: {restored['name']}:localbackbone01", err


def test_a_version_naming_a_hub_id_or_a_relative_folder_is_never_loaded(restored, tmp_path):
    from model.backbone import load_verified_backbone
    from model.errors import CTTError

    for spec in ("sentence-transformers/all-MiniLM-L6-v2", "~/bert", "bert"):
        with pytest.raises(CTTError, match="neither a known backbone"):
            load_verified_backbone(spec, "0" * 64)
    config = json.loads((store.get_version().path / "ctt.json").read_text())
    assert config["backbone"]["spec"] == "micro"
