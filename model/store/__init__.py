"""Model versions in the BentoML model store: none is ever lost, half-written, or destroyed by a
mistyped command or an archive from elsewhere.

A version is immutable and self-contained: the task bank and task registry (``ctt.json``), the
evaluation set of every task (so later versions can re-measure old tasks), the version's result
record (``metrics.json``) and accuracy-matrix plot, and a manifest with the sha256 of every file
(``model/integrity.py``). Everything that changes the store (registering, deleting, stages,
imports, repairs) holds one lock per model name, so two ``ctt learn`` cannot both pick the same
parent and lose a task.

The package, along its lines:

- ``layout``: where things are (``models/``, ``ctt-staging/``, ``ctt-state/``), built only from
  names and versions that passed ``model/tags.py``;
- ``lock``: the store lock, and Ctrl-C held back while a change commits;
- ``hooks``: the kill and failure injection tests place at named steps;
- ``ledger``: registration order and lineage (the one notion of "newest"), and the history of
  deletions and repairs;
- ``versions``: reading versions, finding one by tag, registering and committing a new one;
- ``repair``: what can be wrong (``ctt verify``), repairs, deletion;
- ``stages``: approvals for staging and production.

Every name used outside the package is imported from here (``from model.store import NAME``).
"""

from model.store.hooks import KILL_HOOK_VARIABLE, checkpoint
from model.store.layout import (
    EVAL_DIR, METRICS_FILE, STAGING_DIR, STATE_DIR, model_name, models_dir, staging_dir, staging_name, state_dir,
    version_dir,
)
from model.store.ledger import read_history, record
from model.store.lock import store_lock
from model.store.repair import (
    Deletion, RepairPlan, delete_version, deletion_plan, repair_plan, repair_store, store_problems,
)
from model.store.stages import STAGES, check_stage, read_stages, rollback_stage, set_stage, stage_version, stages_of
from model.store.versions import (
    StoreWriteFailed, Version, commit_version, find_version, get_version, has_versions, list_versions,
    present_versions, read_metrics, read_record, read_version, register_version, resolve_name, task_summaries,
)

__all__ = [
    "Deletion", "EVAL_DIR", "KILL_HOOK_VARIABLE", "METRICS_FILE", "RepairPlan", "STAGES", "STAGING_DIR", "STATE_DIR",
    "check_stage",
    "StoreWriteFailed", "Version", "checkpoint", "commit_version", "delete_version", "deletion_plan",
    "find_version", "get_version", "has_versions", "list_versions", "model_name", "models_dir",
    "present_versions", "read_history", "read_metrics", "read_record", "read_stages", "read_version", "record",
    "register_version", "repair_plan", "repair_store", "resolve_name", "rollback_stage", "set_stage",
    "stage_version", "stages_of", "staging_dir", "staging_name", "state_dir", "store_lock", "store_problems",
    "task_summaries", "version_dir",
]
