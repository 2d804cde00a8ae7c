"""The model store never loses a task: the lock, atomic registration under kills, digests, delete,
stages and repair. Real BentoML store in the tests' temporary home, micro backbone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import pytest
import torch

from model import store
from model.errors import CTTError
from model.integrity import MANIFEST_FILE, version_problems
from tests.conftest import SPORT
from training.cli import main
from training.learn import learn

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ctt_process(*argv, env_extra=None) -> subprocess.Popen:
    """``ctt`` as its own process, from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "training.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """A test run started in the background (`make test &` in a script) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt: give the Ctrl-C tests a terminal's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def micro_learn_args(task, train, *extra):
    return ["learn", "--task", task, "--train", str(train), "--backbone", "micro", "--epochs", "1", "--quiet", *extra]


def assert_store_sound():
    """Every listed version verifies and loads; nothing partial is listed anywhere BentoML looks."""
    listed = {str(m.tag) for m in bentoml.models.list(store.model_name())} if store.models_dir().joinpath(
        store.model_name()).is_dir() else set()
    assert listed == {v.tag for v in store.list_versions()}
    for version in store.list_versions():
        assert version_problems(version.path) == []
        version.load()


# ----- concurrency -----------------------------------------------------------------------------
def test_two_learns_started_together_both_land_in_latest(empty_store, topic_files, question_files):
    # Hold the lock while both start, so they certainly overlap: each must say it waits, and the
    # second to get the lock must start from the first one's version.
    lock_path = store.state_dir() / f"{empty_store}.lock"
    store.state_dir().mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    holder = FileLock(str(lock_path), thread_local=False)
    holder.acquire()
    try:
        first = ctt_process(*micro_learn_args("topic", topic_files[0]))
        second = ctt_process(*micro_learn_args("question", question_files[0]))
        time.sleep(0.5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (first.poll() is None and second.poll() is None
                                                   and _waiting(first) and _waiting(second)):
            time.sleep(0.2)
    finally:
        holder.release()
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    latest = store.get_version()
    assert sorted(latest.metadata["tasks"]) == ["question", "topic"]
    assert len(store.list_versions()) == 2
    # (_waiting already read the start of each stderr)
    assert all("waiting for another ctt command" in getattr(p, "_seen", "") + err
               for p, (_, err) in zip((first, second), outputs))
    assert_store_sound()


def _waiting(process: subprocess.Popen) -> bool:
    # The waiting line is the first thing a quiet learn writes to stderr.
    import select

    ready, _, _ = select.select([process.stderr], [], [], 0)
    if ready:
        process._seen = getattr(process, "_seen", "") + os.read(process.stderr.fileno(), 4096).decode()
    return "waiting for another ctt command" in getattr(process, "_seen", "")


def test_no_wait_fails_at_once_with_one_line(capsys, empty_store, topic_files):
    from filelock import FileLock

    store.state_dir().mkdir(parents=True, exist_ok=True)
    holder = FileLock(str(store.state_dir() / f"{empty_store}.lock"), thread_local=False)
    with holder:
        started = time.monotonic()
        code, _, err = run(capsys, *micro_learn_args("topic", topic_files[0], "--no-wait"))
    assert code != 0 and time.monotonic() - started < 30
    lines = [line for line in err.splitlines() if line.startswith("ctt: error:")]
    assert len(lines) == 1 and "another ctt command is changing the model store" in lines[0]
    assert "Traceback" not in err and store.list_versions() == []


# ----- kills during registration ---------------------------------------------------------------
STEPS = ["staging-created", "files-written", "manifest-written", "synced", "prepared", "ledger-written", "renamed",
         "latest-written"]


@pytest.fixture
def registered(empty_store, topic_files, micro_settings):
    """One version in the store, and the loaded model to register again in forked children."""
    report = learn("topic", *topic_files, settings=micro_settings())
    version = store.get_version(report.tag)
    return version, version.load()


def _register_in_child(model, version, kill_at: str) -> int:
    """Register ``model`` in a forked child that kills itself at ``kill_at``; returns its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT was inherited ignored
        try:
            os.environ[store.KILL_HOOK_VARIABLE] = kill_at
            store.register_version(model, eval_sets=[version.eval_set(0)], metadata={"parent": version.tag},
                                   labels={"stage": "development"})
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("how", ["KILL", "INT"])
def test_a_kill_at_any_step_of_registration_leaves_only_complete_versions(registered, how):
    version, model = registered
    before = {v.tag for v in store.list_versions()}
    for step in STEPS:
        status = _register_in_child(model, version, f"{step}:{how}" if how == "INT" else step)
        if how == "KILL":
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, step
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, step
        assert_store_sound()
        now = {v.tag for v in store.list_versions()}
        # Until the rename nothing appears; from the rename on the version is there, complete. Ctrl-C
        # is held back from the ledger's commit on, so the registration it interrupts completes.
        committed = STEPS.index(step) >= STEPS.index("renamed" if how == "KILL" else "ledger-written")
        assert len(now - before) == (1 if committed else 0), step
        before = now
        # The newest version is found by creation time, even where 'latest' was not yet updated.
        assert store.get_version().tag == max(store.list_versions(), key=lambda v: v.created).tag
    problems = store.store_problems(check_all=True)
    if how == "KILL":  # staging leftovers, and a stale latest after the kill right after the rename
        assert any("leftover" in p for p in problems)
    store.repair_store()
    assert store.store_problems(check_all=True) == []
    assert not any(store.staging_dir().iterdir())


def test_ctrl_c_in_a_real_learn_process_registers_nothing(empty_store, topic_files):
    process = ctt_process(*micro_learn_args("topic", topic_files[0]),
                         env_extra={store.KILL_HOOK_VARIABLE: "manifest-written:INT"})
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "nothing was registered" in err and "Traceback" not in err
    assert store.list_versions() == [] and store.store_problems() == []


def test_sigkill_of_a_real_learn_process_after_the_rename(capsys, empty_store, topic_files):
    process = ctt_process(*micro_learn_args("topic", topic_files[0]), env_extra={store.KILL_HOOK_VARIABLE: "renamed"})
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert_store_sound()
    assert len(store.list_versions()) == 1
    code, out, _ = run(capsys, "verify", "--all")
    assert code == 1 and "latest" in out  # BentoML's pointer was not written yet
    code, _, err = run(capsys, "verify", "--repair", "--yes", "--all")
    assert code == 0 and "latest now points" in err
    assert bentoml.models.get(f"{empty_store}:latest").tag == bentoml.models.get(store.get_version().tag).tag


# ----- verified versions -----------------------------------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


def _edit_model_yaml(folder: Path, old: str, new: str) -> None:
    text = (folder / "model.yaml").read_text()
    assert old in text
    (folder / "model.yaml").write_text(text.replace(old, new, 1))


TAMPERING = {
    "flip a byte of the weights": (lambda f: _flip_last_byte(f / "tasks.safetensors"), "tasks.safetensors does not match"),
    "truncate the weights": (lambda f: os.truncate(f / "tasks.safetensors", 100), "tasks.safetensors has 100 bytes"),
    "truncate an evaluation set": (lambda f: os.truncate(f / "eval_sets/0.jsonl", 10), "eval_sets/0.jsonl has 10 bytes"),
    "edit the registry": (lambda f: _edit_json(f / "ctt.json", lambda d: d["tasks"][0]["labels"].reverse()),
                          "ctt.json does not match"),
    "edit the record": (lambda f: _edit_json(f / "metrics.json", lambda d: d["accuracy"].update(topic=0.0)),
                        "metrics.json"),
    "remove a file": (lambda f: (f / "accuracy_matrix.png").unlink(), "accuracy_matrix.png is missing"),
    "add a file": (lambda f: (f / "eval_sets" / "9.jsonl").write_text("{}\n"), "eval_sets/9.jsonl was added"),
    "edit the manifest": (lambda f: _edit_json(f / MANIFEST_FILE, lambda d: d["files"].pop("metrics.json")),
                          "ctt-manifest.json does not match"),
    "remove the manifest": (lambda f: (f / MANIFEST_FILE).unlink(), "ctt-manifest.json is missing"),
    "edit model.yaml metadata": (lambda f: _edit_model_yaml(f, "mean_accuracy:", "mean_accuracy: 0.99\n  old_mean:"),
                                 "model.yaml was edited"),
    "edit model.yaml labels": (lambda f: _edit_model_yaml(f, "stage: development", "stage: production"),
                               "model.yaml was edited"),
    "break model.yaml": (lambda f: (f / "model.yaml").write_text("name: [unclosed\n"), "model.yaml is unreadable"),
}


def test_every_kind_of_tampering_is_detected_and_named(registered, tmp_path):
    version, _ = registered
    assert version_problems(version.path) == []
    for name, (tamper, message) in TAMPERING.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(version.path, copy)
        tamper(copy)
        problems = version_problems(copy)
        assert problems and any(message in p for p in problems), (name, problems)


def test_a_tampered_version_is_refused_by_load_verify_and_predict(capsys, registered, topic_files):
    version, _ = registered
    _flip_last_byte(version.path / "tasks.safetensors")
    with pytest.raises(CTTError, match="tasks.safetensors does not match its recorded sha256"):
        store.get_version(version.tag).load()
    code, out, err = run(capsys, "verify", version.tag)
    assert code == 1 and out.strip().endswith("tasks.safetensors does not match its recorded sha256 (changed or damaged)")
    assert "Traceback" not in err
    code, _, err = run(capsys, "predict", "--task", "topic", "--text", "goal")
    assert code == 2 and "tasks.safetensors" in err and "Traceback" not in err
    # It cannot be approved for a stage, and nothing is learned on top of it: the parent is
    # loaded through the store.
    code, _, err = run(capsys, "stage", "set", version.tag, "production")
    assert code == 2 and "tasks.safetensors" in err
    code, _, err = run(capsys, "learn", "--task", "more", "--train", str(topic_files[0]), "--epochs", "1", "--quiet")
    assert code == 2 and "tasks.safetensors" in err and len(store.list_versions()) == 1


def test_a_child_pins_its_parent_digest(capsys, registered, question_files, micro_settings):
    parent, _ = registered
    child = learn("question", *question_files, settings=micro_settings())
    assert store.get_version(child.tag).metadata["parent_manifest_sha256"] == parent.digest
    assert run(capsys, "verify", "--all")[0] == 0


# ----- delete ----------------------------------------------------------------------------------
def test_delete_refuses_referenced_versions_unless_forced(capsys, registered, question_files, micro_settings):
    parent, _ = registered
    child = learn("question", *question_files, settings=micro_settings())
    code, _, err = run(capsys, "models", "delete", parent.tag)
    assert code == 2 and f"referenced by child version {child.tag}" in err
    code, _, _ = run(capsys, "stage", "set", child.tag, "staging")
    assert code == 0
    code, _, err = run(capsys, "models", "delete", child.tag)
    assert code == 2 and "referenced by stage staging" in err
    code, out, _ = run(capsys, "models", "delete", "--force", "--yes", parent.tag)
    assert code == 0 and parent.tag in out
    assert [v.tag for v in store.list_versions()] == [child.tag]
    code, _, err = run(capsys, "models", "delete", "nosuchversion")
    assert code == 2 and "not in the BentoML model store" in err
    code, _, err = run(capsys, "models", "delete", store.model_name())
    assert code == 2 and "not 'latest'" in err
    assert_store_sound()


def test_deleting_the_newest_moves_latest_back(capsys, registered, question_files, micro_settings):
    parent, _ = registered
    child = learn("question", *question_files, settings=micro_settings())
    assert run(capsys, "models", "delete", "--yes", child.tag)[0] == 0
    assert bentoml.models.get(f"{store.model_name()}:latest").tag.version == parent.tag.split(":")[1]
    assert run(capsys, "models", "delete", "--yes", parent.tag)[0] == 0
    assert store.list_versions() == [] and not (store.models_dir() / store.model_name()).exists()


# ----- stages ----------------------------------------------------------------------------------
def test_stage_set_rollback_show_and_history(capsys, registered, question_files, micro_settings):
    first, _ = registered
    second = learn("question", *question_files, settings=micro_settings())
    assert run(capsys, "stage", "set", first.tag, "production")[0] == 0
    assert run(capsys, "stage", "set", second.tag, "production")[0] == 0
    code, out, _ = run(capsys, "stage", "show", "production")
    assert code == 0 and out.strip() == second.tag
    code, out, _ = run(capsys, "models")
    assert code == 0 and any(line.startswith(second.tag) and "production" in line for line in out.splitlines())
    code, out, _ = run(capsys, "stage", "rollback", "production")
    assert code == 0 and out.strip() == f"production: {first.tag}"
    assert run(capsys, "stage", "show", "production")[1].strip() == first.tag
    code, _, err = run(capsys, "stage", "rollback", "production")
    assert code == 2 and "no earlier version to roll back to" in err
    history = store.read_stages()["history"]
    assert [(h["action"], h["tag"]) for h in history] == [("set", first.tag), ("set", second.tag), ("rollback", first.tag)]
    assert all(h["digest"] for h in history)
    code, _, err = run(capsys, "stage", "set", first.tag, "prod")
    assert code == 2 and "unknown stage 'prod'" in err
    code, _, err = run(capsys, "stage", "show", "staging")
    assert code == 2 and "no version is approved for staging" in err


def test_a_stage_pins_the_digest_of_the_approved_version(capsys, registered):
    version, _ = registered
    assert run(capsys, "stage", "set", version.tag, "production")[0] == 0
    (version.path / "eval_sets" / "0.jsonl").write_text('{"text": "x", "label": "sport"}\n')
    code, _, err = run(capsys, "stage", "show", "production")
    assert code == 2 and "eval_sets/0.jsonl" in err and "Traceback" not in err


# ----- listing and repair ----------------------------------------------------------------------
def test_leftovers_are_ignored_by_listing_and_removed_by_repair(capsys, registered):
    version, _ = registered
    leftover = store.staging_dir() / f"{store.model_name()}@abandoned"
    other_models = store.staging_dir() / f"{store.model_name()}-other@1234"  # another model's: left alone
    other_models.mkdir(parents=True)
    leftover.mkdir(parents=True)
    (leftover / "tasks.safetensors").write_bytes(b"partial")
    stray = store.models_dir() / store.model_name() / "halfcopied"  # as BentoML's copytree leaves one
    stray.mkdir()
    assert [v.tag for v in store.list_versions()] == [version.tag]
    code, out, _ = run(capsys, "verify")
    assert code == 1 and "leftover" in out and "halfcopied" in out
    code, _, err = run(capsys, "verify", "--repair", "--yes")
    assert "removed" in err and not leftover.exists() and other_models.exists()
    assert run(capsys, "models", "delete", "--force", "--yes", f"{store.model_name()}:halfcopied")[0] == 0
    assert run(capsys, "verify", "--all")[0] == 0


def test_verify_on_an_empty_store_and_bad_arguments(capsys, empty_store):
    code, _, err = run(capsys, "verify")
    assert code == 0 and "0 version(s) verified" in err
    code, _, err = run(capsys, "verify", "nosuchversion")
    assert code == 2 and "not in the BentoML model store" in err
    code, _, err = run(capsys, "verify", "abc", "--all")
    assert code == 2 and "not both" in err


def test_registered_versions_are_ordinary_bentoml_models(registered):
    version, _ = registered
    model = bentoml.models.get(version.tag)
    assert str(model.tag) == version.tag and model.info.metadata["tasks"] == ["topic"]
    assert [str(m.tag) for m in bentoml.models.list(store.model_name())] == [version.tag]
    texts = SPORT[:4]
    assert torch.equal(version.load().logits(texts, ["topic"] * 4), store.get_version().load().logits(texts, ["topic"] * 4))
