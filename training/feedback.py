"""``ctt feedback``: export stored feedback as a labelled file, prune old rows (they hold users'
text), show live accuracy, run migrations; and what ``ctt learn --feedback`` adds to training."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping

from model.errors import CTTError
from model.feedback.api import parse_age, parse_since  # noqa: F401  (the CLI's options)
from model.feedback.database import FeedbackDatabase, data_dir_for, latest_labels, open_database, utc_now
from model.settings import SecretSource, setting_value
from training.data import Example



def open_from_environ(environ: Mapping[str, str] | None = None) -> FeedbackDatabase:
    """The database the service of this environment uses: DATABASE_URL / DATABASE_URL_FILE, else
    the SQLite file under CTT_DATA_DIR (default: ctt-data in the BentoML home)."""
    environ = os.environ if environ is None else environ
    configured = SecretSource("DATABASE_URL", environ).get()
    return open_database(configured, data_dir_for(setting_value("CTT_DATA_DIR", environ), environ),
                         timeout_s=setting_value("CTT_DB_TIMEOUT_S", environ))


def default_retention() -> str:
    """``ctt feedback prune``'s default age: CTT_FEEDBACK_RETENTION_DAYS."""
    return f"{setting_value('CTT_FEEDBACK_RETENTION_DAYS')}d"


def rows_stored_before(database: FeedbackDatabase, cutoff: datetime) -> int:
    """How many rows ``ctt feedback prune`` would delete for ``cutoff`` (a naive UTC time)."""
    return database.count() - sum(row["rows"] for row in database.stats(since=cutoff))


def prune_before(database: FeedbackDatabase, cutoff: datetime) -> int:
    """Delete the rows stored before ``cutoff`` (the time shown to the operator); returns how many."""
    return database.prune(utc_now() - cutoff)


@dataclass
class FeedbackBatch:
    """Feedback examples for one task, ready for training, and what the version records of them."""

    examples: list[Example]
    info: dict = field(default_factory=dict)


def feedback_batch(database: FeedbackDatabase, task: str, since: datetime | None = None) -> FeedbackBatch:
    """Every stored row of ``task`` (one per text, the newest label winning), with the facts a
    version records: rows read, examples kept, and the last row id, so the next run can tell
    which feedback this version has seen."""
    rows = database.rows(task, since=since)
    kept = latest_labels(rows)
    examples = [Example(row.text.strip(), row.label) for row in kept if row.text.strip()]
    info = {"rows": len(rows), "examples": len(examples), "up_to_id": max((r.id for r in rows), default=None),
            "sources": {source: sum(1 for r in kept if r.source == source) for source in ("review", "correction")},
            "database": database.public_url}
    if since is not None:
        info["since"] = since.isoformat(timespec="seconds") + "Z"
    return FeedbackBatch(examples, info)


def export_feedback(database: FeedbackDatabase, task: str, out: Path, since: datetime | None = None) -> dict:
    """Write ``task``'s feedback as JSONL that ``ctt learn --train`` reads (text, label, plus the
    row's id, source and time); written to a temporary file and renamed, so a reader never sees
    half a file."""
    out = Path(out)
    if out.is_dir():
        raise CTTError(f"--out {out} is a folder; name a .jsonl file")
    if not out.parent.is_dir():
        raise CTTError(f"--out {out}: the folder {out.parent} does not exist")
    rows = database.rows(task, since=since)
    kept = latest_labels(rows)
    partial = out.with_name(f".{out.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as stream:
            for row in kept:
                stream.write(json.dumps({"text": row.text, "label": row.label, "id": row.id, "source": row.source,
                                         "created_at": row.created_at.isoformat(timespec="seconds") + "Z"},
                                        ensure_ascii=False) + "\n")
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CTTError(f"--out {out}: cannot write ({exc.strerror})") from None
    return {"task": task, "rows": len(rows), "examples": len(kept),
            "up_to_id": max((r.id for r in rows), default=None), "out": str(out)}


__all__ = ["FeedbackBatch", "export_feedback", "feedback_batch", "open_from_environ", "parse_age", "parse_since",
           "prune_before", "rows_stored_before"]
