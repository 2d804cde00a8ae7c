"""The HTTP side of feedback: the ``POST /feedback`` request schema (checked against the served
version's tasks and labels while the body is parsed, so a bad item is a 400 naming it and nothing
of that request is stored; a value no supported database can store, such as a NUL character,
is refused on every database, so a row accepted in development is storable in production), the
``GET /feedback/stats`` document, and the Prometheus series the live-accuracy alert reads."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from model.errors import CTTError
from model.feedback.database import FeedbackItem, utc_now
from model.feedback.schema import DEFAULT_SOURCE, KEY_MAX_CHARS, SOURCES, TASK_MAX_CHARS, storable_problem
from model.serving.schemas import VISIBLE_PATTERN, text_problem

# What the OpenAPI document says of every stored string: no NUL character (schema.py's
# storable_problem is the rule; this states it). "not" of a string that contains one, so null passes.
STORABLE_SCHEMA = {"not": {"type": "string", "pattern": "\\u0000"}}
FEEDBACK_PATH = "/feedback"
FEEDBACK_STATS_PATH = "/feedback/stats"
# What GET /feedback/stats?since= takes: an age back from now (ISO times are for the CLI). Five
# digits of weeks still land after year 1, so every value the pattern allows is a valid time.
SINCE_PATTERN = r"^[0-9]{1,5}[mhdw]$"
AGE_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


AGE_UNIT_NAMES = {"m": "minute", "h": "hour", "d": "day", "w": "week"}


def parse_age(text: str, option: str = "--older-than") -> timedelta:
    """``90d``, ``12h``, ``30m`` (minutes), ``2w``; a bare number is days. An age that reaches back
    before the year 1 is an error, never an overflow."""
    match = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,6})?)\s*([mhdw]?)\s*", text or "") if isinstance(text, str) else None
    if not match:
        raise CTTError(f"{option} {_shown(text)}: give an age such as 90d, 12h, 30m (minutes) or 2w")
    try:
        age = float(match.group(1)) * AGE_UNITS[match.group(2) or "d"]
        utc_now() - age  # representable as a time, or the age is out of range
    except OverflowError:
        raise CTTError(f"{option} {_shown(text)}: too long an age (it reaches back before the year 1)") from None
    return age


def describe_age(age: timedelta) -> str:
    """An age in words, in the largest unit it is a whole number of (``3 minutes``, ``90 days``)."""
    for unit in "wdhm":
        count = age / AGE_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)} {AGE_UNIT_NAMES[unit]}{'s' if count != 1 else ''}"
    return f"{age.total_seconds():g} seconds"


def _shown(text) -> str:
    from model.tags import shown

    return shown(text)


def parse_since(text: str, option: str = "--since") -> datetime:
    """An ISO date or time (UTC), or an age back from now (``7d``)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        age = parse_age(text, option)
        try:
            return utc_now() - age
        except OverflowError:
            raise CTTError(f"{option} {text!r}: too long an age") from None
    # Rows are stored in UTC without a zone; a time given with a zone is converted to it.
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


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


__all__ = ["FEEDBACK_PATH", "FEEDBACK_STATS_PATH", "FeedbackAccepted", "FeedbackMetrics", "feedback_request_model",
           "parse_age", "parse_since", "stats_document"]
