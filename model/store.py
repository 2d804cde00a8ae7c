"""Model versions in the BentoML model store, registered so that none is ever lost or half-written.

A version is immutable and self-contained: the task bank and task registry (``ctt.json``), the
evaluation set of every task (so later versions can re-measure old tasks), the version's result
record (``metrics.json``) and accuracy-matrix plot, and a manifest with the sha256 of every file
(``model/integrity.py``). BentoML's own ``bentoml.models.create`` is not used to register: it
copies a temporary folder into the store with ``copytree``, so a kill during the copy leaves a
partial version. Instead a version is written into a staging folder beside the store (same
filesystem, outside ``models/<name>/`` so BentoML never lists it), fsynced, and moved into
``models/<name>/<version>`` with one ``rename``: the version appears complete or not at all.
``latest`` is then replaced atomically too.

Everything that changes the store (registering, deleting, stages, imports, repairs) holds one
lock per model name, so two ``ctt learn`` cannot both pick the same parent and lose a task.

Beside BentoML's ``models/`` folder this module keeps (in the BentoML home):
``ctt-staging/`` versions being written (leftovers of a killed run; ``ctt verify --repair``),
``ctt-state/<name>.lock`` the store lock, ``ctt-state/<name>.stages.json`` stage approvals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from model.ctt import ContinualTinyTransformer
from model.errors import CTTError
from model.settings import setting_value
from model.integrity import (
    MANIFEST_DIGEST_KEY, MODEL_YAML, fsync_path, fsync_tree, manifest_digest, verify_version, version_problems,
    write_atomically, write_manifest,
)

EVAL_DIR = "eval_sets"
METRICS_FILE = "metrics.json"  # the version's one result record (training/learn.py builds it)
STAGING_DIR = "ctt-staging"
STATE_DIR = "ctt-state"
STAGES = ("staging", "production")
KILL_HOOK_VARIABLE = "CTT_TEST_KILL_AT"


def model_name() -> str:
    return setting_value("CTT_MODEL_NAME")


# ----- layout --------------------------------------------------------------------------------
def models_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


def _home() -> Path:
    # Beside the (resolved) models folder, so a staged version is on the same filesystem and
    # its rename into the store is atomic.
    return models_dir().resolve().parent


def staging_dir() -> Path:
    return _home() / STAGING_DIR


def state_dir() -> Path:
    return _home() / STATE_DIR


def _name_dir(name: str | None = None) -> Path:
    return models_dir() / (name or model_name())


# ----- test hook -----------------------------------------------------------------------------
def checkpoint(step: str) -> None:
    """Tests place a kill at a named step: CTT_TEST_KILL_AT=<step>[:INT] (SIGKILL by default)."""
    wanted = os.environ.get(KILL_HOOK_VARIABLE)
    if not wanted:
        return
    name, _, signal_name = wanted.partition(":")
    if name == step:
        os.kill(os.getpid(), signal.SIGINT if signal_name == "INT" else signal.SIGKILL)


# ----- lock ----------------------------------------------------------------------------------
_held: dict[str, int] = {}  # lock path -> depth, so nested store operations in one process re-enter


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def store_lock(wait: bool = True, say: Callable[[str], None] = _say, name: str | None = None) -> Iterator[None]:
    """Hold the store's lock: one writer at a time per model name, across processes.

    The lock is an OS file lock (``filelock``), so a killed holder releases it at once.
    """
    from filelock import FileLock, Timeout

    try:
        state_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTTError(f"cannot create the model store's lock folder {state_dir()}: {exc.strerror}") from None
    path = str(state_dir() / f"{name or model_name()}.lock")
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    lock = FileLock(path, thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise CTTError(f"another ctt command is changing the model store {model_name()!r} "
                           f"(lock {path}); try again later, or leave out --no-wait to wait for it") from None
        say(f"waiting for another ctt command to finish changing the model store {model_name()!r} (lock {path})")
        lock.acquire()
    _held[path] = 1
    try:
        yield
    finally:
        _held.pop(path, None)
        lock.release()


def _lock_is_free() -> bool:
    from filelock import FileLock, Timeout

    path = str(state_dir() / f"{model_name()}.lock")
    if _held.get(path) or not Path(path).exists():  # nobody ever locked this store: no writer now
        return True
    lock = FileLock(path, thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


@contextmanager
def _interrupts_deferred() -> Iterator[list]:
    """Hold back Ctrl-C while a registration commits, so the store and the user's report agree."""
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        # None means a handler installed outside Python; Python's own is the sensible fallback.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


# ----- versions ------------------------------------------------------------------------------
@dataclass
class Version:
    tag: str
    path: Path
    metadata: dict
    labels: dict
    created: str

    @property
    def parent(self) -> str | None:
        return self.metadata.get("parent")

    @property
    def digest(self) -> str | None:
        """The version's manifest digest: it pins every file of the version."""
        return self.metadata.get(MANIFEST_DIGEST_KEY)

    def metrics(self) -> dict:
        return read_record(self.path)

    record = metrics

    def eval_set(self, task_index: int) -> list[dict]:
        path = self.path / EVAL_DIR / f"{task_index}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def verify(self) -> str:
        return verify_version(self.path)

    def load(self, max_tasks: int | None = None) -> ContinualTinyTransformer:
        """Load the model after checking every file against the version's manifest."""
        self.verify()
        return ContinualTinyTransformer.load(self.path, max_tasks)


def read_record(folder: str | Path) -> dict:
    """A version folder's result record (``metrics.json``): accuracy of every task, the accuracy
    matrix, forgetting, BWT, probe accuracies, per-task sizes, training settings. Empty for
    versions registered without one."""
    try:
        return json.loads((Path(folder) / METRICS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise CTTError(f"{folder}: {METRICS_FILE} is not valid JSON") from None


read_metrics = read_record  # the name the service and older code use


def task_summaries(folder: str | Path) -> list[dict]:
    """What ``/tasks`` serves, from the version's record: per task its labels, accuracy now and
    when learned, the probe's accuracy, example counts and calibration (its temperature and ECE
    before and after; None for versions before calibrated scores). Versions registered before the
    record held these fall back to the task registry's ``info``."""
    from model.ctt import read_config

    record = read_record(folder)
    registry = read_config(Path(folder))
    summaries = []
    for task in registry["tasks"]:
        name, info = task["name"], task.get("info") or {}
        summaries.append({
            "name": name,
            "labels": record.get("labels", {}).get(name, task["labels"]),
            "accuracy": record.get("accuracy", {}).get(name),
            "learned_accuracy": record.get("learned_accuracy", {}).get(name, info.get("learned_accuracy")),
            "probe_accuracy": record.get("probe_accuracy", {}).get(name, info.get("probe_accuracy")),
            "examples": record.get("examples", {}).get(name) or {
                key: info[key] for key in ("train_examples", "held_out_examples", "eval_examples") if key in info},
            "calibration": record.get("calibration", {}).get(name),
        })
    return summaries


def _read_version(folder: Path) -> Version | None:
    """A complete version in the store, or None for anything else (a stray file or folder)."""
    from bentoml._internal.models.model import Model

    if not (folder / MODEL_YAML).is_file():
        return None
    try:
        model = Model.from_path(folder)
    except Exception:  # BentoML's own errors for a malformed model.yaml; verify reports them
        return None
    info = model.info
    return Version(tag=str(model.tag), path=folder, metadata=dict(info.metadata),
                   labels=dict(info.labels), created=info.creation_time.isoformat())


def list_versions() -> list[Version]:
    """Complete versions, newest first. Folders BentoML could not read are skipped (``ctt verify``
    reports them)."""
    folder = _name_dir()
    if not folder.is_dir():
        return []
    versions = [v for child in folder.iterdir() if child.is_dir() and (v := _read_version(child))]
    return sorted(versions, key=lambda v: v.created, reverse=True)


def has_versions() -> bool:
    return bool(list_versions())


def normalise_tag(tag: str) -> str:
    """Accept ``name:version``, a bare version, or ``name`` / ``name:latest``."""
    return tag if ":" in tag else (f"{tag}:latest" if tag == model_name() else f"{model_name()}:{tag}")


def get_version(tag: str | None = None) -> Version:
    """The version named by ``tag`` (any accepted form, a unique prefix too), or the newest one.

    The newest is found by creation time, not by BentoML's ``latest`` file, which a kill between
    the rename and its update may have left one version behind.
    """
    wanted = normalise_tag(tag) if tag else f"{model_name()}:latest"
    name, _, version = wanted.partition(":")
    versions = list_versions() if name == model_name() else _versions_of(name)
    if not versions and (not tag or version == "latest"):
        raise CTTError(f"the BentoML model store has no {name!r} model yet: run 'ctt learn' or 'ctt demo'")
    if version == "latest":
        return versions[0]
    matches = [v for v in versions if v.tag == wanted] or [v for v in versions if v.tag.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CTTError(f"model version {tag!r} is ambiguous: {', '.join(v.tag for v in matches)}")
    if (models_dir() / name / version).is_dir():
        raise CTTError(f"model version {tag!r} is damaged ({MODEL_YAML} is missing or unreadable): "
                       "run 'ctt verify --all'")
    raise CTTError(f"model version {tag!r} is not in the BentoML model store")


def _versions_of(name: str) -> list[Version]:
    folder = _name_dir(name)
    if not folder.is_dir():
        return []
    versions = [v for child in folder.iterdir() if child.is_dir() and (v := _read_version(child))]
    return sorted(versions, key=lambda v: v.created, reverse=True)


def _write_latest(name: str) -> None:
    """Point BentoML's ``latest`` at the newest complete version (or remove it when none is left)."""
    folder = _name_dir(name)
    versions = _versions_of(name)
    if versions:
        write_atomically(folder / "latest", versions[0].tag.split(":", 1)[1])
    elif folder.is_dir():
        shutil.rmtree(folder)


def _new_info(name: str, labels: dict, metadata: dict):
    from bentoml._internal.models.model import ModelContext, ModelInfo, ModelOptions
    from bentoml._internal.tag import Tag

    return ModelInfo(
        tag=Tag(name).make_new_version(), module="", labels=labels, options=ModelOptions(),
        metadata=metadata, context=ModelContext(framework_name="", framework_versions={}),
        signatures={}, api_version="v1",
    )


def _with_metadata(info, metadata: dict):
    from bentoml._internal.models.model import ModelInfo

    return ModelInfo(tag=info.tag, module=info.module, labels=dict(info.labels), options=info.options,
                     metadata=metadata, context=info.context, signatures=info.signatures,
                     api_version=info.api_version, creation_time=info.creation_time)


def _write_info(folder: Path, info) -> None:
    with open(folder / MODEL_YAML, "w", encoding="utf-8") as stream:
        info.dump(stream)


def register_version(
    model: ContinualTinyTransformer,
    *,
    eval_sets: list[list[dict]],
    metadata: dict,
    labels: dict,
    write_extra: Callable[[Path, str], None] | None = None,
) -> Version:
    """Register ``model`` as a new immutable version; returns it.

    ``eval_sets`` aligns with ``model.tasks``. ``write_extra(folder, tag)`` may add files (the
    record, plots) once the new version's tag is known. The version is staged, hashed, fsynced
    and renamed into the store under the store lock: a kill at any moment leaves either no
    version or a complete one.
    """
    from bentoml._internal.models.model import ModelInfo

    name = model_name()
    # The store's metadata takes only basic types; an absent value (no parent yet) is left out.
    metadata = {key: value for key, value in metadata.items() if value is not None}
    with store_lock():
        info = _new_info(name, labels, metadata)
        tag = str(info.tag)
        version = info.tag.version
        staged = staging_dir() / f"{name}@{version}"
        final = _name_dir(name) / version
        staging_dir().mkdir(parents=True, exist_ok=True)
        staged.mkdir()
        try:
            checkpoint("staging-created")
            model.save(staged)
            (staged / EVAL_DIR).mkdir(exist_ok=True)
            for index, examples in enumerate(eval_sets):
                lines = (json.dumps(example, ensure_ascii=False) for example in examples)
                (staged / EVAL_DIR / f"{index}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            if write_extra is not None:
                write_extra(staged, tag)
            checkpoint("files-written")
            # model.yaml is written, read back and only then hashed, so the digest is of exactly
            # what every later reader will parse.
            _write_info(staged, info)
            with open(staged / MODEL_YAML, encoding="utf-8") as stream:
                written = ModelInfo.from_yaml_file(stream)
            digest = write_manifest(staged, written)
            checkpoint("manifest-written")
            _write_info(staged, _with_metadata(written, {**dict(written.metadata), MANIFEST_DIGEST_KEY: digest}))
            verify_version(staged)  # the version must pass the check every reader applies
            fsync_tree(staged)
            checkpoint("synced")
            created = not _name_dir(name).is_dir()
            _name_dir(name).mkdir(parents=True, exist_ok=True)
            if created:
                fsync_path(models_dir())
            with _interrupts_deferred() as interrupted:
                os.rename(staged, final)  # the commit point
                checkpoint("renamed")
                fsync_path(final.parent)
                write_atomically(final.parent / "latest", version)
                checkpoint("latest-written")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    if interrupted:
        raise KeyboardInterrupt(f"interrupted; {tag} had already been registered and is complete")
    return get_version(tag)


# ----- problems and repair -------------------------------------------------------------------
def store_problems(tag: str | None = None, check_all: bool = True) -> list[str]:
    """One line per problem: damaged versions, leftovers of killed runs, a stale ``latest``,
    stage approvals or lineage that no longer match the versions' digests."""
    problems: list[str] = []
    if tag:
        version = get_version(tag)
        problems += version_problems(version.path)
        return problems
    folder = _name_dir()
    versions = list_versions()
    by_tag = {v.tag: v for v in versions}
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.is_dir() and _read_version(child) is None:
                problems.append(f"{model_name()}:{child.name}: not a complete version ({MODEL_YAML} missing or "
                                f"unreadable); delete it with 'ctt models delete --force {model_name()}:{child.name}'")
    for version in versions if check_all else versions[:1]:
        problems += version_problems(version.path)
        parent = by_tag.get(version.parent or "")
        recorded = version.metadata.get("parent_manifest_sha256")
        if parent is not None and recorded and parent.digest != recorded:
            problems.append(f"{version.tag}: its parent {parent.tag} is not the version it was learned from "
                            "(parent digest differs)")
    if versions:
        latest = folder / "latest"
        pointed = latest.read_text().strip() if latest.is_file() else None
        if pointed != versions[0].tag.split(":", 1)[1]:
            problems.append(f"{model_name()}: BentoML's latest points to {pointed!r}, the newest version is "
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
    if _lock_is_free():  # a staging folder under a held lock is a registration in progress
        for leftover in _leftovers():
            problems.append(f"leftover of an interrupted registration or import: {leftover}; "
                            "'ctt verify --repair' removes it")
    return problems


def staging_name(name: str, kind: str) -> str:
    """A staging folder's name; '@' never occurs in a BentoML tag name, so one model's leftovers
    never look like another's."""
    return f"{name}@{kind}-{uuid.uuid4().hex[:8]}"


def _leftovers() -> list[Path]:
    prefix = f"{model_name()}@"
    found = []
    if staging_dir().is_dir():
        found += [p for p in sorted(staging_dir().iterdir()) if p.name.startswith(prefix)]
    if _name_dir().is_dir():
        found += [p for p in sorted(_name_dir().iterdir()) if p.is_file() and p.name.startswith(".latest.")]
    return found


def repair_store() -> list[str]:
    """Remove leftovers of killed runs and point ``latest`` at the newest version; what was done."""
    done = []
    with store_lock():
        for leftover in _leftovers():
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            done.append(f"removed {leftover}")
        folder = _name_dir()
        versions = list_versions()
        if versions:
            latest = folder / "latest"
            before = latest.read_text().strip() if latest.is_file() else None
            if before != versions[0].tag.split(":", 1)[1]:
                _write_latest(model_name())
                done.append(f"latest now points to {versions[0].tag}")
    return done


# ----- delete --------------------------------------------------------------------------------
def delete_version(tag: str, force: bool = False) -> str:
    """Delete one version; refuses one that a stage or a child version references unless forced."""
    with store_lock():
        wanted = normalise_tag(tag)
        name, _, version_name = wanted.partition(":")
        if version_name == "latest":
            raise CTTError("name the version to delete explicitly (ctt models lists them), not 'latest'")
        try:
            version = get_version(tag)
            target, full_tag = version.path, version.tag
        except CTTError:
            # A damaged folder (no readable model.yaml) can still be removed, by its exact name.
            target, full_tag = _name_dir(name) / version_name, wanted
            if not force or not target.is_dir():
                raise
        if not force:
            users = [f"stage {stage}" for stage, stack in read_stages().get("stages", {}).items()
                     if any(entry["tag"] == full_tag for entry in stack)]
            users += [f"child version {v.tag}" for v in list_versions() if v.parent == full_tag]
            if users:
                raise CTTError(f"refusing to delete {full_tag}: referenced by {', '.join(users)} "
                               "(--force deletes it anyway)")
        # Move it out of the store in one rename first, so a kill never leaves half a version listed.
        staging_dir().mkdir(parents=True, exist_ok=True)
        doomed = staging_dir() / staging_name(name, "deleted")
        os.rename(target, doomed)
        fsync_path(target.parent)
        _write_latest(name)
        shutil.rmtree(doomed)
    return full_tag


# ----- stages --------------------------------------------------------------------------------
def _stages_path() -> Path:
    return state_dir() / f"{model_name()}.stages.json"


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


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise CTTError(f"unknown stage {stage!r}: use {' or '.join(STAGES)}")


def _record_stage(stage: str, entry: dict, action: str, stages: dict) -> None:
    stages.setdefault("history", []).append({"stage": stage, "action": action, **entry})
    state_dir().mkdir(parents=True, exist_ok=True)
    write_atomically(_stages_path(), json.dumps(stages, indent=2) + "\n")


def _entry(version: Version, by: str | None) -> dict:
    return {"tag": version.tag, "digest": version.digest, "at": datetime.now(timezone.utc).isoformat(),
            "by": by or "unknown"}


def set_stage(tag: str, stage: str, by: str | None = None) -> Version:
    """Approve ``tag`` for ``stage`` (after verifying every file of it)."""
    _check_stage(stage)
    with store_lock():
        version = get_version(tag)
        version.verify()
        stages = read_stages()
        stack = stages.setdefault("stages", {}).setdefault(stage, [])
        entry = _entry(version, by)
        stack.append(entry)
        _record_stage(stage, entry, "set", stages)
    return version


def rollback_stage(stage: str, by: str | None = None) -> Version:
    """Return ``stage`` to the version it had before the current approval."""
    _check_stage(stage)
    with store_lock():
        stages = read_stages()
        stack = stages.get("stages", {}).get(stage, [])
        if len(stack) < 2:
            raise CTTError(f"stage {stage} has no earlier version to roll back to")
        previous = stack[-2]
        version = get_version(previous["tag"])
        if version.verify() != previous["digest"]:
            raise CTTError(f"cannot roll {stage} back to {previous['tag']}: it differs from the version approved then")
        stack.pop()
        _record_stage(stage, _entry(version, by), "rollback", stages)
    return version


def stage_version(stage: str) -> Version:
    """The version approved for ``stage``, verified against the digest recorded at approval."""
    _check_stage(stage)
    stack = read_stages().get("stages", {}).get(stage, [])
    if not stack:
        raise CTTError(f"no version is approved for {stage}: run 'ctt stage set TAG {stage}'")
    current = stack[-1]
    version = get_version(current["tag"])
    if version.verify() != current["digest"]:
        raise CTTError(f"{current['tag']} differs from the version approved for {stage} (digest changed)")
    return version


def stages_of(tag: str) -> list[str]:
    return [stage for stage, stack in read_stages().get("stages", {}).items() if stack and stack[-1]["tag"] == tag]
