"""Versions: reading them, finding one by tag, and registering a new one so that none is ever lost,
half-written or left "failed" while in place.

A version is written into a staging folder beside the store (same filesystem, outside
``models/<name>/`` so BentoML never lists it), hashed, fsynced, and committed by swaps that need no
space: the ledger (written beside it beforehand), one ``rename`` of the folder into
``models/<name>/<version>``, and BentoML's ``latest`` (written beforehand too). A kill leaves no
version or a complete one; a write that fails (disk full, I/O error, permissions) at any step
leaves no version and says so, and the store as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from model.errors import CTTError
from model.integrity import (
    MANIFEST_DIGEST_KEY, MODEL_YAML, fsync_path, fsync_tree, prepare_replacement, verify_version,
    write_atomically, write_manifest,
)
from model.store.hooks import checkpoint
from model.store.layout import (
    EVAL_DIR, METRICS_FILE, latest_path, model_name, models_dir, name_dir, staging_dir, staging_name, state_dir,
    version_dir,
)
from model.store.ledger import ledger_path, ledger_text, lineage_from, new_entry, read_ledger, with_entry
from model.store.lock import interrupts_deferred, store_lock
from model.tags import TagRef, parse_tag, part_problem, shown

if TYPE_CHECKING:
    from model.ctt import ContinualTinyTransformer


class StoreWriteFailed(CTTError):
    """Writing to the store failed (disk full, I/O error, permissions); the message says what is
    left. Not the operator's input: the command exits 1."""

    exit_code = 1


def describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass
class Version:
    tag: str
    path: Path
    metadata: dict
    labels: dict
    created: str  # BentoML's creation time: another machine's clock for an import, never an order

    @property
    def name(self) -> str:
        return self.tag.partition(":")[0]

    @property
    def version(self) -> str:
        return self.tag.partition(":")[2]

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

    def load(self, max_tasks: int | None = None) -> "ContinualTinyTransformer":
        """Load the model after checking every file against the version's manifest."""
        from model.ctt import ContinualTinyTransformer

        self.verify()
        return ContinualTinyTransformer.load(self.path, max_tasks)


def read_record(folder: str | Path) -> dict:
    """A version folder's result record (``metrics.json``): accuracy of every task, the accuracy
    matrix, forgetting, BWT, probe accuracies, per-task sizes, training settings. Empty for
    versions registered without one."""
    try:
        record = json.loads((Path(folder) / METRICS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise CTTError(f"{folder}: {METRICS_FILE} is not valid JSON") from None
    if not isinstance(record, dict):
        raise CTTError(f"{folder}: {METRICS_FILE} is not a JSON object")
    return record


read_metrics = read_record  # the name the service and older code use


def task_summaries(folder: str | Path, record: dict | None = None, registry: dict | None = None) -> list[dict]:
    """What ``/tasks`` serves, from the version's record: per task its labels, accuracy now and
    when learned, the probe's accuracy, example counts and calibration (its temperature and ECE
    before and after; None for versions before calibrated scores). Versions registered before the
    record held these fall back to the task registry's ``info``. A part of the record of the wrong
    shape (a damaged or hand-edited file) reads as absent; labels always come from the registry the
    model is built from. A caller that has read the record or the registry already passes them."""
    from model.registry import read_config

    def section(mapping, key) -> dict:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        return value if isinstance(value, dict) else {}

    record = read_record(folder) if record is None else record
    registry = read_config(Path(folder)) if registry is None else registry
    summaries = []
    for task in registry["tasks"]:
        name, info = task["name"], task.get("info") if isinstance(task.get("info"), dict) else {}
        examples = section(section(record, "examples"), name) or {
            key: info[key] for key in ("train_examples", "held_out_examples", "eval_examples") if key in info}
        summaries.append({
            "name": name,
            "labels": task["labels"],
            "accuracy": section(record, "accuracy").get(name),
            "learned_accuracy": section(record, "learned_accuracy").get(name, info.get("learned_accuracy")),
            "probe_accuracy": section(record, "probe_accuracy").get(name, info.get("probe_accuracy")),
            "examples": examples,
            "calibration": section(section(record, "calibration"), name) or None,
        })
    return summaries


# ----- reading -------------------------------------------------------------------------------
def read_version(folder: Path, name: str | None = None) -> Version | None:
    """The version in ``folder`` when its ``model.yaml`` is readable and names it (``name``, when
    given, and the folder's own name as the version); None for anything else."""
    from model.bentoml_internals import read_model_info

    if folder.is_symlink() or not (folder / MODEL_YAML).is_file():
        return None
    try:
        with open(folder / MODEL_YAML, encoding="utf-8") as stream:
            info = read_model_info(stream)
    except Exception:  # BentoML's own errors for a malformed model.yaml; verify reports them
        return None
    if name is not None and (info.tag.name != name or info.tag.version != folder.name):
        return None
    return Version(tag=str(info.tag), path=folder, metadata=dict(info.metadata),
                   labels=dict(info.labels), created=info.creation_time.isoformat())


def present_versions(name: str | None = None) -> dict[str, Version]:
    """Every readable version folder in ``models/<name>/``, registered by ctt or not."""
    name = name or model_name()
    folder = name_dir(name)
    if not folder.is_dir():
        return {}
    found = {}
    for child in sorted(folder.iterdir()):
        if part_problem(child.name) is None and child.is_dir() and (version := read_version(child, name)):
            found[version.tag] = version
    return found


def ledger_entries(name: str, present: dict[str, Version] | None = None) -> list[dict]:
    """The ledger, oldest first; for a store from before the ledger, its versions in creation order."""
    entries = read_ledger(name)
    if entries is not None:
        return entries
    adopted: list[dict] = []
    for version in sorted((present if present is not None else present_versions(name)).values(),
                          key=lambda v: v.created):
        adopted.append(new_entry(version.tag, version.digest, version.parent,
                                 lineage_from(version.parent, adopted), "adopted"))
    return adopted


def list_versions(name: str | None = None) -> list[Version]:
    """The versions ctt registered that are in the store, newest first (registration order).
    Folders BentoML could not read, and versions put there around ctt, are left out (``ctt verify``
    reports them)."""
    name = name or model_name()
    present = present_versions(name)
    ordered: dict[str, Version] = {}
    for entry in ledger_entries(name, present):
        if entry["tag"] in present:
            ordered.pop(entry["tag"], None)
            ordered[entry["tag"]] = present[entry["tag"]]
    return list(reversed(ordered.values()))


def has_versions() -> bool:
    return bool(list_versions())


def find_version(ref: TagRef, *, exact: bool = False) -> Version:
    """The registered version ``ref`` names (exactly, or by a unique prefix unless ``exact``), or the
    newest when it names no version."""
    versions = list_versions(ref.name)
    if ref.version is None:
        if not versions:
            raise CTTError(f"the BentoML model store has no {ref.name!r} model yet: run 'ctt learn' or 'ctt demo'")
        return versions[0]
    wanted = f"{ref.name}:{ref.version}"
    matches = [v for v in versions if v.tag == wanted]
    if not matches and not exact:
        matches = [v for v in versions if v.tag.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CTTError(f"model version {wanted} is ambiguous: {', '.join(v.tag for v in matches)}")
    folder = version_dir(ref.name, ref.version)
    if os.path.lexists(folder):
        if wanted in present_versions(ref.name):
            raise CTTError(f"model version {wanted} is in the store but ctt never registered it (put there by "
                           "'bentoml models import' or by hand?): 'ctt verify' explains; restore versions "
                           "with 'ctt import'")
        raise CTTError(f"model version {wanted} is damaged ({MODEL_YAML} is missing or unreadable): "
                       "run 'ctt verify --all'")
    raise CTTError(f"model version {wanted} is not in the BentoML model store")


def get_version(tag: str | None = None, what: str = "tag") -> Version:
    """The version named by ``tag`` (``name:version``, a bare version, a unique prefix, ``name`` or
    ``name:latest``), or the newest one. The tag is parsed strictly first (``model/tags.py``): an
    empty or malformed tag is an error, never "the newest"."""
    ref = TagRef(model_name(), None) if tag is None else parse_tag(tag, model_name(), what)
    return find_version(ref)


def newest_tag(name: str, entries: list[dict], present: set[str]) -> str | None:
    registered = [e["tag"] for e in entries if e["tag"] in present]
    return registered[-1] if registered else None


def write_latest(name: str) -> None:
    """Point BentoML's ``latest`` at the newest registered version; with none, remove it (and the
    name's folder if nothing else is in it)."""
    present = present_versions(name)
    newest = newest_tag(name, ledger_entries(name, present), set(present))
    latest = latest_path(name)
    if newest:
        if not latest.is_file() or latest.read_text().strip() != newest.partition(":")[2]:
            write_atomically(latest, newest.partition(":")[2])
        return
    latest.unlink(missing_ok=True)
    _remove_if_empty(name_dir(name))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (stray folders stay for 'ctt verify' to report) or already gone
        pass


# ----- committing ------------------------------------------------------------------------------
def commit_version(staged: Path | None, tag: str, digest: str | None, parent: str | None,
                   lineage: list[str] | None = None, how: str = "learned") -> list:
    """Move a complete, verified version from the staging folder into the store as ``tag``, with its
    ledger entry and ``latest``; the caller holds the store lock. ``staged`` None registers a version
    already in the store (checked by the caller). Returns the Ctrl-C signals held back meanwhile.
    On an OSError the store is left as it was and StoreWriteFailed says so; the staged folder is
    removed either way."""
    name = tag.partition(":")[0]
    entries = ledger_entries(name)
    entry = new_entry(tag, digest, parent, lineage_from(parent, entries) if lineage is None else lineage, how)
    if staged is None:
        try:
            write_atomically(ledger_path(name), ledger_text(name, with_entry(entries, entry)))
            write_latest(name)
        except OSError as exc:
            raise StoreWriteFailed(f"could not register {tag}: {describe(exc)}") from None
        return []
    return _commit(staged, entry)


def _commit(staged: Path, entry: dict) -> list:
    name, _, version = entry["tag"].partition(":")
    final = version_dir(name, version)
    present = present_versions(name)
    before = read_ledger(name)
    after = with_entry(ledger_entries(name, present), entry)
    newest = newest_tag(name, after, set(present) | {entry["tag"]})
    ledger, latest = ledger_path(name), latest_path(name)
    old_latest = latest.read_text() if latest.is_file() else None
    prepared: list[Path] = []
    done: list[str] = []
    created = not name_dir(name).is_dir()
    try:
        name_dir(name).mkdir(parents=True, exist_ok=True)
        if created:
            fsync_path(models_dir())
        state_dir().mkdir(parents=True, exist_ok=True)
        # Every byte the commit needs is written now: the swaps below need no space.
        prepared.append(prepare_replacement(ledger, ledger_text(name, after)))
        prepared.append(prepare_replacement(latest, newest.partition(":")[2]))
        checkpoint("prepared")
        with interrupts_deferred() as interrupted:
            os.replace(prepared[0], ledger)
            done.append("ledger")
            fsync_path(ledger.parent)
            checkpoint("ledger-written")
            os.rename(staged, final)  # the commit point
            done.append("version")
            checkpoint("renamed")
            fsync_path(final.parent)
            os.replace(prepared[1], latest)
            done.append("latest")
            checkpoint("latest-written")
            fsync_path(final.parent)
    except OSError as exc:
        _undo(entry["tag"], staged, final, done, before, old_latest)
        if created:
            _remove_if_empty(name_dir(name))
        raise StoreWriteFailed(f"could not register {entry['tag']}: {describe(exc)}; nothing was registered "
                               "and the store is as it was") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        for path in prepared:
            path.unlink(missing_ok=True)
    return interrupted


def _undo(tag: str, staged: Path, final: Path, done: list[str], ledger_before: list[dict] | None,
          old_latest: str | None) -> None:
    """Take back a commit that failed half way. The version leaves the store first (a rename) and
    its files are removed, which frees space for the two small files that are put back."""
    name = tag.partition(":")[0]
    if "version" in done:
        doomed = staging_dir() / staging_name(name, "undone")
        try:
            os.rename(final, doomed)
        except OSError as exc:
            raise StoreWriteFailed(f"registering {tag} failed after it was renamed into the store, and it could "
                                   f"not be taken out again ({describe(exc)}): it is registered; run "
                                   "'ctt verify' and 'ctt verify --repair'") from None
        staged = doomed
    shutil.rmtree(staged, ignore_errors=True)
    try:
        if "latest" in done:
            if old_latest is None:
                latest_path(name).unlink(missing_ok=True)
            else:
                write_atomically(latest_path(name), old_latest)
        if "ledger" in done:
            if ledger_before is None:
                ledger_path(name).unlink(missing_ok=True)
            else:
                write_atomically(ledger_path(name), ledger_text(name, ledger_before))
    except OSError as exc:
        # The version is gone; a ledger entry without its folder is ignored, and 'latest' is fixed by repair.
        raise StoreWriteFailed(f"could not register {tag}: nothing was registered, but the store's records could "
                               f"not be put back ({describe(exc)}): run 'ctt verify --repair'") from None


def register_version(
    model: "ContinualTinyTransformer",
    *,
    eval_sets: list[list[dict]],
    metadata: dict,
    labels: dict,
    write_extra: Callable[[Path, str], None] | None = None,
) -> Version:
    """Register ``model`` as a new immutable version, newest of the store; returns it.

    ``eval_sets`` aligns with ``model.tasks``. ``write_extra(folder, tag)`` may add files (the
    record, plots) once the new version's tag is known. The version is staged, hashed, fsynced
    and committed under the store lock: a kill at any moment leaves either no version or a
    complete one, and a failed write leaves none (StoreWriteFailed).
    """
    import bentoml

    from model.bentoml_internals import model_info_with_metadata, new_model_info, read_model_info, write_model_info

    name = model_name()
    # The store's metadata takes only basic types; an absent value (no parent yet) is left out.
    metadata = {key: value for key, value in metadata.items() if value is not None}
    with store_lock():
        info = new_model_info(bentoml.Tag(name).make_new_version(), labels, metadata)
        tag = str(info.tag)
        staged = staging_dir() / staging_name(name, "new")
        try:
            staging_dir().mkdir(parents=True, exist_ok=True)
            staged.mkdir()
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
            with open(staged / MODEL_YAML, "w", encoding="utf-8") as stream:
                write_model_info(stream, info)
            with open(staged / MODEL_YAML, encoding="utf-8") as stream:
                written = read_model_info(stream)
            digest = write_manifest(staged, written)
            checkpoint("manifest-written")
            with open(staged / MODEL_YAML, "w", encoding="utf-8") as stream:
                write_model_info(stream, model_info_with_metadata(
                    written, {**dict(written.metadata), MANIFEST_DIGEST_KEY: digest}))
            digest = verify_version(staged)  # the version must pass the check every reader applies
            fsync_tree(staged)
            checkpoint("synced")
        except BaseException as exc:
            shutil.rmtree(staged, ignore_errors=True)
            if isinstance(exc, OSError) or _is_write_error(exc):
                raise StoreWriteFailed(f"could not write the new version of {name!r}: {_reason(exc)}; "
                                       "nothing was registered") from None
            raise
        interrupted = commit_version(staged, tag, digest, metadata.get("parent"))
    if interrupted:
        raise KeyboardInterrupt(f"interrupted; {tag} had already been registered and is complete")
    return find_version(TagRef(name, info.tag.version), exact=True)


# safetensors reports a failed write as its own exception type, with the OS error in the text:
# "Error while serializing: I/O error: No space left on device (os error 28)".
_SAFETENSORS_OS_ERROR = re.compile(r"I/O error: (.*?) \(os error \d+\)")


def _is_write_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "SafetensorError" and bool(_SAFETENSORS_OS_ERROR.search(str(exc)))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return describe(exc)
    match = _SAFETENSORS_OS_ERROR.search(str(exc))
    return match.group(1) if match else str(exc).splitlines()[0][:200]


def resolve_name(tag: str, what: str) -> TagRef:
    """``tag`` parsed; it must name a version of this store's model (CTT_MODEL_NAME)."""
    ref = parse_tag(tag, model_name(), what)
    if ref.name != model_name():
        raise CTTError(f"{what} {shown(tag)} is a version of model {ref.name!r}; this command works on "
                       f"CTT_MODEL_NAME={model_name()!r}")
    return ref
