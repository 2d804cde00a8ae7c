"""Where the store keeps things, beside BentoML's ``models/`` folder (in the BentoML home):

``models/<name>/<version>/``   a version (BentoML lists it), ``models/<name>/latest`` BentoML's newest
``ctt-staging/<name>@<kind>-<id>/``   versions being written, imported or deleted (leftovers of a killed run)
``ctt-state/<name>.lock``   the store lock, ``<name>.ledger.json`` the registration order,
``<name>.stages.json`` stage approvals, ``history.jsonl`` what was deleted and repaired, when, by whom.

Every path below is built from a model name and a version that passed ``model/tags.py``, so none
can leave its folder.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from model.errors import CTTError
from model.tags import part_problem, shown

EVAL_DIR = "eval_sets"
METRICS_FILE = "metrics.json"  # the version's one result record (training/learn.py builds it)
LATEST_FILE = "latest"  # BentoML's pointer to a name's newest version
STAGING_DIR = "ctt-staging"
STATE_DIR = "ctt-state"
STAGING_SEPARATOR = "@"  # never in a BentoML tag, so one model's leftovers never look like another's


def model_name() -> str:
    """``CTT_MODEL_NAME``, checked against the tag rules by the settings table."""
    from model.settings import setting_value

    return setting_value("CTT_MODEL_NAME")


def models_dir() -> Path:
    from model.bentoml_internals import model_store_dir

    return model_store_dir()


def home() -> Path:
    # Beside the (resolved) models folder, so a staged version is on the same filesystem and
    # its rename into the store is atomic.
    return models_dir().resolve().parent


def staging_dir() -> Path:
    return home() / STAGING_DIR


def state_dir() -> Path:
    return home() / STATE_DIR


def checked_part(value: str, what: str) -> str:
    problem = part_problem(value)
    if problem:  # callers parse tags first: this is the last line of defence, never an operator's message
        raise CTTError(f"{what} {shown(value)} {problem}")
    return value


def name_dir(name: str | None = None) -> Path:
    return models_dir() / checked_part(name or model_name(), "model name")


def version_dir(name: str, version: str) -> Path:
    return name_dir(name) / checked_part(version, "version")


def latest_path(name: str) -> Path:
    return name_dir(name) / LATEST_FILE


def staging_name(name: str, kind: str) -> str:
    """A staging folder's name: the model name, '@', what it is for and a random part."""
    return f"{checked_part(name, 'model name')}{STAGING_SEPARATOR}{kind}-{uuid.uuid4().hex[:8]}"


def contained_version(name: str, version: str) -> Path:
    """The folder of ``name:version`` for a destructive command, only if it is a real folder directly
    under ``models/<name>/``: never a link, never anything its resolved path places elsewhere."""
    folder = version_dir(name, version)
    if folder.is_symlink() or not folder.is_dir():
        raise CTTError(f"{name}:{version} is not a folder of the model store ({folder})")
    if folder.resolve().parent != name_dir(name).resolve() or folder.resolve().name != version:
        raise CTTError(f"{name}:{version} resolves outside {name_dir(name)}; refusing to touch it")
    return folder
