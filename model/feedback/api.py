"""The HTTP side of feedback: the ``POST /feedback`` request schema (checked against the served
version's tasks and labels while the body is parsed, so a bad item is a 400 naming it and nothing
of that request is stored), the ``GET /feedback/stats`` document, and the Prometheus series the
live-accuracy alert reads."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.errors import CTTError
from model.feedback.database import FeedbackItem, utc_now
from model.feedback.schema import DEFAULT_SOURCE, KEY_MAX_CHARS, SOURCES, TASK_MAX_CHARS
from model.serving import echo, text_problem

FEEDBACK_PATH = "/feedback"
FEEDBACK_STATS_PATH = "/feedback/stats"
LISTED = 20  # an unknown task's or label's error lists this many known ones
AGE_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_age(text: str, option: str = "--older-than") -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``; a bare number is days."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw]?)\s*", text or "")
    if not match:
        raise CTTError(f"{option} {text!r}: give an age such as 90d, 12h, 30m or 2w")
    try:
        return float(match.group(1)) * AGE_UNITS[match.group(2) or "d"]
    except OverflowError:
        raise CTTError(f"{option} {text!r}: too long an age") from None


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


def _listed(names: Sequence[str]) -> str:
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return ", ".join(names[:LISTED]) + more


def feedback_request_model(task_labels: Mapping[str, Sequence[str]], max_items: int,
                           max_text_chars: int) -> type[BaseModel]:
    """The request schema for the served version: ``task_labels`` maps each task to its labels."""
    task_names = list(task_labels)

    class FeedbackIn(BaseModel):
        model_config = ConfigDict(extra="forbid")

        text: str = Field(description="The text that was classified.", json_schema_extra={"maxLength": max_text_chars})
        task: str = Field(description="The task it was classified for.", max_length=TASK_MAX_CHARS)
        label: str = Field(description="The right label, as the user or reviewer says.")
        prediction: str | None = Field(None, description="The label the service predicted, when known: "
                                                         "live accuracy compares it with `label`.")
        source: Literal[SOURCES] = Field(DEFAULT_SOURCE, description=(  # type: ignore[valid-type]
            "`review`: a sampled prediction checked by a reviewer (unbiased, drives the live-accuracy "
            "alert); `correction`: a user fixing a wrong answer (biased towards errors)."))
        request_id: str | None = Field(None, max_length=KEY_MAX_CHARS,
                                       description="The /classify request this feedback is about.")
        id: str | None = Field(None, min_length=1, max_length=KEY_MAX_CHARS, description=(
            "Your unique id for this row: sending it again (a retry) stores nothing new."))

        @field_validator("text")
        @classmethod
        def _text_present_and_bounded(cls, text: str) -> str:
            problem = text_problem(text, max_text_chars)
            if problem:
                raise ValueError(problem)
            return text

        @model_validator(mode="after")
        def _task_and_labels_known(self) -> "FeedbackIn":
            if self.task not in task_labels:
                raise ValueError(f"unknown task {echo(self.task)}; known tasks: {_listed(task_names) or 'none'}")
            labels = task_labels[self.task]
            for field in ("label", "prediction"):
                value = getattr(self, field)
                if value is not None and value not in labels:
                    raise ValueError(f"{field} {echo(value)} is not a label of task {self.task!r} "
                                     f"(labels: {_listed(list(labels))})")
            return self

        def to_item(self) -> FeedbackItem:
            return FeedbackItem(text=self.text, task=self.task, label=self.label, prediction=self.prediction,
                                source=self.source, request_id=self.request_id, id=self.id)

    class FeedbackRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        items: list[FeedbackIn] = Field(min_length=1, max_length=max_items, description=(
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


def stats_document(rows: list[dict], version: str, version_accuracy: Mapping[str, float],
                   since: datetime | None) -> dict:
    """``GET /feedback/stats``: per task, rows by source, agreement of the served predictions with
    the feedback labels, and the accuracy the version measured when it was registered."""
    tasks: dict[str, dict] = {}
    for row in rows:
        task = tasks.setdefault(row["task"], {
            "task": row["task"], "rows": 0, "first": None, "last": None,
            "version_accuracy": version_accuracy.get(row["task"]), "sources": {}})
        task["rows"] += row["rows"]
        task["first"] = min(filter(None, (task["first"], row["first"])))
        task["last"] = max(filter(None, (task["last"], row["last"])))
        task["sources"][row["source"]] = {
            "rows": row["rows"], "with_prediction": int(row["with_prediction"] or 0),
            "agreed": int(row["agreed"] or 0),
            "agreement": agreement(int(row["agreed"] or 0), int(row["with_prediction"] or 0))}
    for task in tasks.values():
        task["first"], task["last"] = _iso(task["first"]), _iso(task["last"])
    return {"version": version, "since": _iso(since), "tasks": list(tasks.values())}


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
