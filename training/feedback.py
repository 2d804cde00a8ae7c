"""``ctt feedback``: export stored feedback as a labelled file, prune old rows (they hold users'
text), show live accuracy, list and purge a revoked credential's rows, run migrations; and what
``ctt learn --feedback`` adds to training, after checking it against the files it would overrule."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping

from model.errors import CTTError
from model.feedback.ages import parse_age, parse_since  # noqa: F401  (the CLI's options)
from model.feedback.database import FeedbackDatabase, data_dir_for, latest_labels, open_database
from model.settings import SecretSource, setting_value
from training.data import Example

UNRECORDED = "(unrecorded)"  # rows stored before feedback recorded its credential (migration 0002)


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


@dataclass
class FeedbackBatch:
    """Feedback examples for one task, ready for training, and what the version records of them.
    ``origins`` holds each example's (source, credential), in the same order."""

    examples: list[Example]
    info: dict = field(default_factory=dict)
    origins: list[tuple[str, str]] = field(default_factory=list)


def feedback_batch(database: FeedbackDatabase, task: str, since: datetime | None = None) -> FeedbackBatch:
    """Every stored row of ``task`` (one per text, the newest label winning), with the facts a
    version records: rows read, examples kept, and the last row id, so the next run can tell
    which feedback this version has seen."""
    rows = database.rows(task, since=since)
    kept = [row for row in latest_labels(rows) if row.text.strip()]
    examples = [Example(row.text.strip(), row.label) for row in kept]
    info = {"rows": len(rows), "examples": len(examples), "up_to_id": max((r.id for r in rows), default=None),
            "sources": {source: sum(1 for r in kept if r.source == source) for source in ("review", "correction")},
            "database": database.public_url}
    if since is not None:
        info["since"] = since.isoformat(timespec="seconds") + "Z"
    return FeedbackBatch(examples, info, [(row.source, row.principal or UNRECORDED) for row in kept])


def _labels_by_text(examples: list[Example]) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        labels[example.text].add(example.label)
    return labels


def vet_feedback(batch: FeedbackBatch, training: list[Example], evaluation_sets: Mapping[str, list[Example]],
                 max_share: float, allowed: bool) -> tuple[list[Example], dict]:
    """Which feedback examples may train, and what the version records of them.

    Feedback never enters an evaluation set, and an evaluation text is never trained on from
    feedback: the gate measures the relearned task on those sets, so they must stay unseen. A
    feedback example *contradicts* when the training file or an evaluation set has the same text
    with other labels only. When more than ``max_share`` of the examples contradict, this raises
    CTTError (the learn is refused) unless ``allowed``: corrections are of production texts,
    which rarely repeat the curated files, so a stream that overrules many of their labels is
    an attack or a mistake, not an honest one."""
    in_file = _labels_by_text(training)
    in_evaluation = _labels_by_text([e for examples in evaluation_sets.values() for e in examples])
    trained: list[Example] = []
    by_source: dict[str, dict] = defaultdict(lambda: {"examples": 0, "contradictions": 0})
    by_credential: dict[str, dict] = defaultdict(lambda: {"examples": 0, "contradictions": 0, "sources": {}})
    contradicts_file = contradicts_evaluation = contradicting = evaluation_texts = 0
    origins = batch.origins or [("correction", UNRECORDED)] * len(batch.examples)
    for example, (source, credential) in zip(batch.examples, origins):
        against_file = example.text in in_file and example.label not in in_file[example.text]
        against_evaluation = example.text in in_evaluation and example.label not in in_evaluation[example.text]
        contradicts_file += against_file
        contradicts_evaluation += against_evaluation
        contradicting += against_file or against_evaluation
        if example.text in in_evaluation:
            evaluation_texts += 1
        else:
            trained.append(example)
        for tally in (by_source[source], by_credential[credential]):
            tally["examples"] += 1
            tally["contradictions"] += against_file or against_evaluation
        sources = by_credential[credential]["sources"]
        sources[source] = sources.get(source, 0) + 1
    share = contradicting / len(batch.examples) if batch.examples else 0.0
    report = {**batch.info, "trained_on": len(trained), "evaluation_texts_not_trained": evaluation_texts,
              "contradictions": {"training_file": contradicts_file, "evaluation": contradicts_evaluation,
                                 "total": contradicting, "share": round(share, 4), "max_share": max_share,
                                 "allowed": allowed},
              "by_source": dict(sorted(by_source.items())), "by_credential": dict(sorted(by_credential.items()))}
    if share > max_share + 1e-12 and not allowed:
        raise CTTError(f"refusing to learn from feedback: {contradicting} of {len(batch.examples)} example(s) "
                       f"({100 * share:.0f} %) give a text another label than the training file or an evaluation "
                       f"set does ({describe_contradictions(report)}); more than --max-feedback-contradictions "
                       f"{max_share:g}. Check those rows (ctt feedback credentials, ctt feedback export), or "
                       "--allow-contradictions to learn them anyway")
    return trained, report


def describe_contradictions(report: dict) -> str:
    """Where the contradicting examples came from, by source and credential, in one line."""
    sources = ", ".join(f"{tally['contradictions']} of {tally['examples']} {source}"
                        for source, tally in report["by_source"].items() if tally["contradictions"])
    credentials = ", ".join(f"{tally['contradictions']} from {credential}"
                            for credential, tally in report["by_credential"].items() if tally["contradictions"])
    return "; ".join(part for part in (sources, credentials) if part) or "none"


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
                                         "credential": row.principal or UNRECORDED,
                                         "created_at": row.created_at.isoformat(timespec="seconds") + "Z"},
                                        ensure_ascii=False) + "\n")
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CTTError(f"--out {out}: cannot write ({exc.strerror})") from None
    return {"task": task, "rows": len(rows), "examples": len(kept),
            "up_to_id": max((r.id for r in rows), default=None), "out": str(out)}


__all__ = ["FeedbackBatch", "export_feedback", "feedback_batch", "open_from_environ", "parse_age", "parse_since"]
