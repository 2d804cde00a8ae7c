"""The HTTP side of feedback: the ``POST /feedback`` request schema (checked against the served
version's tasks and labels while the body is parsed, so a bad item is a 400 naming it and nothing
of that request is stored; a value no supported database can store, such as a NUL character, is
refused on every database, so a row accepted in development is storable in production), what the
routes do (check that the caller may send what it sends, store the rows with the caller's id,
count them, answer the stats), the ``/feedback/stats`` document, the Prometheus series the
live-accuracy alert reads, and the start-up rule that staging and production need a database.
The rows themselves live in ``model/feedback/`` (database, schema, counts, migrations).

The caller is a ``Principal`` (model/serving/auth.py): its id names the credential, never its
secret. Feedback needs the ``feedback`` permission, and ``review`` rows, the unbiased ones the
live-accuracy alert trusts, need ``review`` as well.

The database is opened lazily and migrated in the background when a worker starts: a database
that is down at start (or later) never stops the worker, ``/classify`` or readiness; feedback is
then a 503 with Retry-After until it is back. What each failure maps to:

- ``FeedbackForbidden``: 403 naming the permission and the items that need it;
- ``FeedbackConflict``: 409 naming the ids stored (or repeated) with different content;
- ``FeedbackInvalid``: 400 naming each item (the request schema refuses these first);
- ``FeedbackUnavailable``: 503 with Retry-After; already logged as one line here.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from model.errors import CTTError
from model.feedback.counts import GRANULARITY, window_start
from model.feedback.database import (FeedbackConflict, FeedbackDatabase, FeedbackInvalid, FeedbackItem,
                                     FeedbackUnavailable, normalise_url)
from model.feedback.schema import (DEFAULT_SOURCE, KEY_MAX_CHARS, REVIEW_SOURCE, SOURCES, TASK_MAX_CHARS,
                                   storable_problem)
from model.serving.auth import FEEDBACK_PERMISSION, REVIEW_PERMISSION, Principal
from model.serving.schemas import VISIBLE_PATTERN, text_problem

logger = logging.getLogger("ctt")

# What the OpenAPI document says of every stored string: no NUL character (schema.py's
# storable_problem is the rule; this states it). "not" of a string that contains one, so null passes.
STORABLE_SCHEMA = {"not": {"type": "string", "pattern": "\\u0000"}}


class _FeedbackItemBase(BaseModel):
    """The fields every feedback item has; ``feedback_request_model`` adds the task and its labels."""

    # Strict, as /classify's items: `"id": 5` is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(description="The text that was classified.")
    source: Literal[SOURCES] = Field(DEFAULT_SOURCE, description=(  # type: ignore[valid-type]
        "`review`: a sampled prediction checked by a reviewer (unbiased, drives the live-accuracy "
        "alert); `correction`: a user fixing a wrong answer (biased towards errors)."))
    request_id: str | None = Field(None, max_length=KEY_MAX_CHARS, json_schema_extra=STORABLE_SCHEMA,
                                   description="The /classify request this feedback is about.")
    id: str | None = Field(None, min_length=1, max_length=KEY_MAX_CHARS, json_schema_extra=STORABLE_SCHEMA,
                           description=(
        "Your unique id for this row: sending it again (a retry, the same content) stores nothing new; "
        "the same id with different content is a 409 and nothing of the request is stored."))

    @field_validator("request_id", "id")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        problem = storable_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    def to_item(self) -> FeedbackItem:
        return FeedbackItem(text=self.text, task=self.task, label=self.label,  # type: ignore[attr-defined]
                            prediction=self.prediction, source=self.source,  # type: ignore[attr-defined]
                            request_id=self.request_id, id=self.id)


def _component_name(task: str, index: int) -> str:
    # OpenAPI component names allow letters, digits, '.', '-', '_'.
    return f"FeedbackFor_{re.sub(r'[^A-Za-z0-9._-]', '_', task)}_{index}"


def feedback_request_model(task_labels: Mapping[str, Sequence[str]], max_items: int,
                           max_text_chars: int) -> type[BaseModel]:
    """The request schema for the served version: ``task_labels`` maps each task to its labels.

    Each item is one of a union tagged by ``task``, whose ``label`` and ``prediction`` are that
    task's labels: the OpenAPI document states exactly which rows are accepted, and an unknown
    task or a label of another task is a 400 naming the item while the body is parsed."""

    def text_rule(text: str) -> str:
        problem = text_problem(text, max_text_chars) or storable_problem(text)
        if problem:
            raise ValueError(problem)
        return text

    text_field = (str, Field(description="The text that was classified (no NUL characters: not every "
                                         "supported database can store them).",
                             json_schema_extra={"pattern": VISIBLE_PATTERN, **STORABLE_SCHEMA, "minLength": 1,
                                                "maxLength": max_text_chars}))
    validators = {"text_present_and_bounded": field_validator("text")(text_rule)}
    if not task_labels:
        # The served version could not be read here (the service then fails at start anyway).
        Item: Any = create_model("FeedbackIn", __base__=_FeedbackItemBase, __validators__=validators,
                                 text=text_field, task=(str, Field(max_length=TASK_MAX_CHARS)),
                                 label=(str, ...), prediction=(str | None, None))
    else:
        members = []
        for index, (task, labels) in enumerate(task_labels.items()):
            label_type = Literal[tuple(labels)]  # type: ignore[valid-type]
            members.append(create_model(
                _component_name(task, index), __base__=_FeedbackItemBase, __validators__=validators,
                text=text_field,
                task=(Literal[task], Field(description="The task the text was classified for.")),
                label=(label_type, Field(description=f"The right label: one of {task!r}'s labels.")),
                prediction=(label_type | None, Field(None, description=(
                    "The label the service predicted, when known: live accuracy compares it with `label`.")))))
        Item = Annotated[Union[tuple(members)], Field(discriminator="task")] if len(members) > 1 else members[0]

    class FeedbackRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        items: list[Item] = Field(min_length=1, max_length=max_items, description=(  # type: ignore[valid-type]
            f"1 to {max_items} labelled texts. All are stored, or none (a 400 names each bad item)."))

    return FeedbackRequest


class FeedbackAccepted(BaseModel):
    """A 200: every item is committed (stored now, or by an earlier request with the same id)."""

    stored: int = Field(description="Rows stored by this request.")
    already_stored: int = Field(description="Items whose id was already stored: retries, stored once.")


def agreement(agreed: int, with_prediction: int) -> float | None:
    return round(agreed / with_prediction, 4) if with_prediction else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") + "Z" if moment else None


def _sources(rows: list[dict]) -> dict:
    sources: dict[str, dict] = {}
    for row in rows:
        source = sources.setdefault(row["source"], {"rows": 0, "with_prediction": 0, "agreed": 0})
        for name in ("rows", "with_prediction", "agreed"):
            source[name] += int(row[name] or 0)
    for source in sources.values():
        source["agreement"] = agreement(source["agreed"], source["with_prediction"])
    return dict(sorted(sources.items()))


def _span(rows: list[dict]) -> dict:
    return {"rows": sum(int(row["rows"]) for row in rows),
            "first": _iso(min(row["first"] for row in rows)), "last": _iso(max(row["last"] for row in rows))}


def stats_document(rows: list[dict], version: str, version_accuracy: Mapping[str, float],
                   since: datetime | None, granularity_s: float | None = None) -> dict:
    """``GET /feedback/stats``: per task, rows by source over every served version, the same per
    version (``versions``: the served one first, then by newest row; ``version`` null for rows
    stored without one), and
    the accuracy the served version measured when it was registered. ``since`` is where the
    window starts, ``granularity_s`` how finely windows are cut (they start on a whole hour)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    tasks = []
    for task, task_rows in sorted(by_task.items()):
        by_version: dict[str | None, list[dict]] = {}
        for row in task_rows:
            by_version.setdefault(row.get("model_tag"), []).append(row)
        versions = [{"version": tag, "served": tag == version, **_span(version_rows), "sources": _sources(version_rows)}
                    for tag, version_rows in by_version.items()]
        versions.sort(key=lambda entry: entry["last"] or "", reverse=True)
        versions.sort(key=lambda entry: not entry["served"])  # the served version first
        tasks.append({"task": task, **_span(task_rows), "version_accuracy": version_accuracy.get(task),
                      "sources": _sources(task_rows), "versions": versions})
    return {"version": version, "since": _iso(since), "granularity_s": granularity_s, "tasks": tasks}


class FeedbackMetrics:
    """``ctt_feedback_total{task,source,agreed}`` (agreed: true, false, or unknown when no
    prediction was sent) and ``ctt_task_accuracy{task}``, the accuracy the served version measured
    at registration: the live-accuracy alert compares the reviews' agreement with it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        # Imported here: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker before __init__.
        import prometheus_client as prometheus

        self.feedback = prometheus.Counter(
            "ctt_feedback", "Feedback rows stored, by task, source and whether the served prediction agreed.",
            ["task", "source", "agreed"])
        self.task_accuracy = prometheus.Gauge(
            "ctt_task_accuracy", "Accuracy of each task measured when the served version was registered.",
            ["task"], multiprocess_mode="livemax")

    def record_version(self, accuracy: Mapping[str, float]) -> None:
        if self.enabled:
            for task, value in accuracy.items():
                self.task_accuracy.labels(task=task).set(value)

    def record_stored(self, items: Sequence[FeedbackItem]) -> None:
        if not self.enabled:
            return
        for item in items:
            agreed = "unknown" if item.prediction is None else str(item.prediction == item.label).lower()
            self.feedback.labels(task=item.task, source=item.source, agreed=agreed).inc()


class FeedbackForbidden(CTTError):
    """The caller lacks ``permission`` for ``items`` (positions in the request): nothing stored."""

    def __init__(self, message: str, permission: str, items: list[int]):
        super().__init__(message)
        self.permission = permission
        self.items = items


def check_startup_database(environment: str, fails_closed: bool, configured_url: str | None) -> None:
    """Fail closed like the credentials: outside development and test, pods have only per-pod
    scratch space, so feedback written to a local SQLite file would vanish with the pod."""
    if configured_url:
        normalise_url(configured_url)  # a malformed URL stops the start with one line
    elif fails_closed:
        raise CTTError(f"ENVIRONMENT={environment} needs a database for feedback: set DATABASE_URL_FILE "
                       "(a mounted Secret) or DATABASE_URL (postgresql+psycopg://...); a pod's own disk "
                       "does not outlive it")


def check_permissions(items: Sequence[FeedbackItem], principal: Principal) -> None:
    """Raise FeedbackForbidden unless ``principal`` may send every item."""
    if not principal.may(FEEDBACK_PERMISSION):
        raise FeedbackForbidden(f"sending feedback needs the {FEEDBACK_PERMISSION!r} permission, which this "
                                "credential does not have; nothing was stored", FEEDBACK_PERMISSION,
                                list(range(len(items))))
    reviews = [index for index, item in enumerate(items) if item.source == REVIEW_SOURCE]
    if reviews and not principal.may(REVIEW_PERMISSION):
        listed = ", ".join(map(str, reviews[:20])) + (f" and {len(reviews) - 20} more" if len(reviews) > 20 else "")
        raise FeedbackForbidden(
            f"{'item' if len(reviews) == 1 else 'items'} {listed}: source {REVIEW_SOURCE!r} needs the "
            f"{REVIEW_PERMISSION!r} permission, which this credential does not have (send them as "
            "'correction', or with a reviewer's credential); nothing was stored", REVIEW_PERMISSION, reviews)


class FeedbackEndpoint:
    """One worker's feedback store, metrics and served version facts."""

    def __init__(self, database: FeedbackDatabase, metrics: FeedbackMetrics, version: str,
                 version_accuracy: Mapping[str, float]):
        self.database = database
        self.metrics = metrics
        self.version = version
        self.version_accuracy = dict(version_accuracy)
        metrics.record_version(self.version_accuracy)

    def migrate_in_background(self) -> threading.Thread:
        """Migrate now, so the first request does not wait; failure only logs (requests retry)."""

        def migrate() -> None:
            try:
                self.database.ensure_migrated()
            except FeedbackUnavailable:
                pass  # logged as one line; feedback answers 503 until the database is back

        thread = threading.Thread(target=migrate, name="ctt-feedback-migrate", daemon=True)
        thread.start()
        return thread

    def store(self, items: Sequence[FeedbackItem], principal: Principal) -> FeedbackAccepted:
        """Commit ``items`` with ``principal``'s id on each row and return after the commit; raises
        FeedbackForbidden, FeedbackInvalid, FeedbackConflict or FeedbackUnavailable, and then
        nothing is stored."""
        items = list(items)
        check_permissions(items, principal)
        result = self.database.add(items, model_tag=self.version, principal=principal.id)
        self.metrics.record_stored(result.stored)
        return FeedbackAccepted(stored=len(result.stored), already_stored=result.already_stored)

    def stats(self, since: datetime | None) -> dict:
        """Live accuracy per task and served version, read from the maintained counts: the same
        small amount of work whatever the number of rows. ``since`` is answered from whole hours
        (the document's ``since`` is where the window really starts)."""
        return stats_document(self.database.stats(since), self.version, self.version_accuracy,
                              window_start(since) if since is not None else None,
                              GRANULARITY.total_seconds())


__all__ = ["FeedbackAccepted", "FeedbackConflict", "FeedbackEndpoint",
           "FeedbackForbidden", "FeedbackInvalid", "FeedbackMetrics", "FeedbackUnavailable", "check_permissions",
           "check_startup_database", "feedback_request_model", "stats_document"]
