"""Model versions in the BentoML model store.

A version is immutable and self-contained: the task bank and task registry (``ctt.json``), the
evaluation set of every task (so later versions can re-measure old tasks), the metrics and
accuracy matrix, and in its metadata the parent version, the backbone reference and digest.
``bentoml.models.create`` writes into a temporary folder and moves it into the store only when
the block ends without an exception, so a crash or Ctrl-C never leaves a partial version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from model.ctt import ContinualTinyTransformer
from model.errors import CTTError

DEFAULT_MODEL_NAME = "ctt"
EVAL_DIR = "eval_sets"
METRICS_FILE = "metrics.json"


def model_name() -> str:
    return os.environ.get("CTT_MODEL_NAME", DEFAULT_MODEL_NAME)


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

    def metrics(self) -> dict:
        return read_metrics(self.path)

    def eval_set(self, task_index: int) -> list[dict]:
        path = self.path / EVAL_DIR / f"{task_index}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def load(self, max_tasks: int | None = None) -> ContinualTinyTransformer:
        return ContinualTinyTransformer.load(self.path, max_tasks)


def read_metrics(folder: Path) -> dict:
    """A version folder's metrics.json (empty for versions registered without one)."""
    try:
        return json.loads((folder / METRICS_FILE).read_text())
    except FileNotFoundError:
        return {}


def _version(model: bentoml.Model) -> Version:
    info = model.info
    return Version(
        tag=str(model.tag), path=Path(model.path), metadata=dict(info.metadata),
        labels=dict(info.labels), created=info.creation_time.isoformat(),
    )


def normalise_tag(tag: str) -> str:
    """Accept ``name:version``, a bare version, or ``name`` / ``name:latest``."""
    return tag if ":" in tag else (f"{tag}:latest" if tag == model_name() else f"{model_name()}:{tag}")


def get_version(tag: str | None = None) -> Version:
    """The version named by ``tag`` (any accepted form), or the newest one."""
    wanted = normalise_tag(tag) if tag else f"{model_name()}:latest"
    try:
        return _version(bentoml.models.get(wanted))
    except NotFound:
        if tag:
            raise CTTError(f"model version {tag!r} is not in the BentoML model store") from None
        raise CTTError(
            f"the BentoML model store has no {model_name()!r} model yet: run 'ctt learn' or 'ctt demo'"
        ) from None
    except BentoMLException as exc:
        raise CTTError(f"invalid model tag {tag!r}: {exc}") from None


def list_versions() -> list[Version]:
    try:
        models = bentoml.models.list(model_name())
    except NotFound:
        return []
    versions = [_version(m) for m in models]
    return sorted(versions, key=lambda v: v.created, reverse=True)


def has_versions() -> bool:
    return bool(list_versions())


def register_version(
    model: ContinualTinyTransformer,
    *,
    eval_sets: list[list[dict]],
    metadata: dict,
    labels: dict,
    write_extra: Callable[[Path, str], None] | None = None,
) -> Version:
    """Register ``model`` as a new immutable version; returns it.

    ``eval_sets`` aligns with ``model.tasks``. ``write_extra(folder, tag)`` may add files (metrics,
    plots) once the new version's tag is known.
    """
    # The store's metadata takes only basic types; an absent value (no parent yet) is left out.
    metadata = {key: value for key, value in metadata.items() if value is not None}
    with bentoml.models.create(model_name(), labels=labels, metadata=metadata) as ref:
        folder = Path(ref.path)
        model.save(folder)
        (folder / EVAL_DIR).mkdir(exist_ok=True)
        for index, examples in enumerate(eval_sets):
            lines = (json.dumps(example, ensure_ascii=False) for example in examples)
            (folder / EVAL_DIR / f"{index}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if write_extra is not None:
            write_extra(folder, str(ref.tag))
    return get_version(str(ref.tag))
