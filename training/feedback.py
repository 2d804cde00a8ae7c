"""``ctt feedback``: export stored feedback as a labelled file, prune old rows (they hold users'
text), show live accuracy, run migrations; and what ``ctt learn --feedback`` adds to training."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping

from model.errors import CTTError
from model.feedback.database import FeedbackDatabase, default_data_dir, latest_labels, open_database, utc_now
from model.settings import SecretSource
from training.data import Example

AGE_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
DEFAULT_TIMEOUT_S = 5.0


def open_from_environ(environ: Mapping[str, str] | None = None) -> FeedbackDatabase:
    """The database the service of this environment uses: DATABASE_URL / DATABASE_URL_FILE, else
    the SQLite file under CTT_DATA_DIR (default: ctt-data in the BentoML home)."""
    environ = os.environ if environ is None else environ
    configured = SecretSource("DATABASE_URL", environ).get()
    timeout = float(environ.get("CTT_DB_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    return open_database(configured, default_data_dir(environ), timeout_s=timeout)


def parse_age(text: str, option: str = "--older-than") -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``; a bare number is days."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw]?)\s*", text or "")
    if not match:
        raise CTTError(f"{option} {text!r}: give an age such as 90d, 12h, 30m or 2w")
    return float(match.group(1)) * AGE_UNITS[match.group(2) or "d"]


def parse_since(text: str) -> datetime:
    """An ISO date or time (UTC), or an age back from now (``7d``)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return utc_now() - parse_age(text, "--since")
    # Rows are stored in UTC without a zone; a time given with a zone is converted to it.
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


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


__all__ = ["FeedbackBatch", "export_feedback", "feedback_batch", "open_from_environ", "parse_age", "parse_since"]
