"""Request and response bodies of the service, with the served version's real constraints.

Items are checked while each request's body is parsed, before any request joins a batch, so one
client's bad item is that client's 400 and never reaches another client's forward pass. The same
models are the OpenAPI document's schemas and what BentoML's clients see in ``/schema.json``.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.settings import TASK_NAME_MAX_CHARS

ECHO_CHARS = 32  # how much of a client's unknown value an error repeats
LISTED_TASKS = 20  # an unknown task's error lists this many known tasks


def echo(value: str) -> str:
    """A client's value as an error message may repeat it: cut short, quoted."""
    return repr(value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…")


# Characters that carry nothing on their own: whitespace, controls, soft hyphen, zero-width and
# bidirectional marks, word joiners, the BOM. A text needs at least one other character. One
# rule, used twice: the service checks texts with it, and the OpenAPI document states it.
VISIBLE_PATTERN = r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u205f-\u206f\ufeff]"
_VISIBLE = re.compile(VISIBLE_PATTERN)
# JSON can spell an unpaired UTF-16 surrogate ("\\ud800"), which is not Unicode text and which
# the tokenizer cannot take.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def text_problem(text: str, max_chars: int) -> str | None:
    """Why ``text`` cannot be classified, or None."""
    if len(text) > max_chars:
        return f"text has {len(text)} characters; the limit is {max_chars}"
    if _SURROGATE.search(text):
        return "text contains an unpaired UTF-16 surrogate (not valid Unicode)"
    if not _VISIBLE.search(text):
        return "text is empty (no visible characters)"
    return None


# ----- /classify ----------------------------------------------------------------------------
def item_model(task_names: Sequence[str], max_text_chars: int) -> type[BaseModel]:
    """The item schema with the served model's real constraints, so the OpenAPI document states
    exactly what the service accepts (task names as an enum, the text rule, the length limit)."""
    task_schema: dict[str, Any] = {"maxLength": TASK_NAME_MAX_CHARS}
    if task_names:
        task_schema["enum"] = list(task_names)
    known = frozenset(task_names)

    class Item(BaseModel):
        # Strict: `"probabilities": 0` or `"text": 5` is a mistake to report, not to coerce.
        model_config = ConfigDict(extra="forbid", strict=True)

        text: str = Field(description="The text to classify: Unicode text (no unpaired surrogates) with at "
                                      "least one visible character.", examples=["Shares in the bank rose 5%"],
                          json_schema_extra={"pattern": VISIBLE_PATTERN, "minLength": 1, "maxLength": max_text_chars})
        task: str = Field(description="Name of a learned task (see /tasks).", examples=list(task_names[:1]),
                          json_schema_extra=task_schema)
        probabilities: bool = Field(False, description="Also return the probability of every label.")

        @field_validator("text")
        @classmethod
        def _text_present_and_bounded(cls, text: str) -> str:
            problem = text_problem(text, max_text_chars)
            if problem:
                raise ValueError(problem)
            return text

        @field_validator("task")
        @classmethod
        def _task_known(cls, task: str) -> str:
            if len(task) > TASK_NAME_MAX_CHARS:
                raise ValueError(f"task names have at most {TASK_NAME_MAX_CHARS} characters")
            if known and task not in known:
                listed = ", ".join(task_names[:LISTED_TASKS]) + (
                    f" and {len(task_names) - LISTED_TASKS} more (/tasks)" if len(task_names) > LISTED_TASKS else "")
                raise ValueError(f"unknown task {echo(task)}; known tasks: {listed}")
            return task

    return Item


def classify_request_model(task_names: Sequence[str], max_items: int, max_text_chars: int) -> type[BaseModel]:
    Item = item_model(task_names, max_text_chars)

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        items: list[Item] = Field(min_length=1, max_length=max_items, description=(  # type: ignore[valid-type]
            f"1 to {max_items} texts, each with its task; each text at most {max_text_chars} characters."))

    return ClassifyRequest


class Prediction(BaseModel):
    task: str
    label: str
    score: float = Field(description="Probability of the predicted label.")
    probabilities: dict[str, float] | None = Field(None, description="Every label's probability, on request.")


class PassOutcome(BaseModel):
    """One item of a forward pass: its prediction, or why it has none (``item``: this item fails
    on its own; ``service``: the pass fails whatever it is given; ``unknown``: not a ticket this
    worker issued)."""

    prediction: Prediction | None = None
    failure: Literal["item", "service", "unknown"] | None = None


# ----- errors -------------------------------------------------------------------------------
class Problem(BaseModel):
    """Where a request is wrong: ``loc`` is the path into the body, e.g. ``["items", 2, "task"]``."""

    loc: list[str | int]
    message: str


class ErrorBody(BaseModel):
    """Every error the service answers has this shape."""

    error: str = Field(description="What went wrong, in one line.")
    problems: list[Problem] = Field(default_factory=list, description="Each problem of a rejected body.")


ERROR_MEANINGS = {
    400: "The body is not a valid request: `problems` names each item and field.",
    401: "Missing or invalid credentials.",
    403: "The credentials lack the permission this request needs (named in `error`).",
    404: "No such path.",
    405: "The path does not take this method.",
    409: "An item's `id` was stored before with other content: nothing of the request is stored.",
    413: "The body is larger than CTT_MAX_BODY_BYTES.",
    415: "The body is not JSON.",
    422: "An item passed validation but the model could not process it; `problems` names it.",
    429: "The worker handles CTT_MAX_CONCURRENCY requests already.",
    500: "The service failed; its log has the reason.",
    503: "The model is loading, the worker is busier than CTT_MAX_WAIT_S, the credentials cannot be read, or "
         "the feedback database is unreachable: retry after the Retry-After header.",
}


# ----- read-only documents ------------------------------------------------------------------
class NoInput(BaseModel):
    """The body of a read-only API's POST: an empty object."""

    model_config = ConfigDict(extra="forbid")


def feedback_stats_request_model(since_pattern: str) -> type[BaseModel]:
    class FeedbackStatsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        since: str | None = Field(None, pattern=since_pattern, description=(
            "Only rows stored in this last stretch of time: 30m, 12h, 7d or 4w."))

    return FeedbackStatsRequest


class TaskCalibration(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    method: str = Field(description='"temperature", or "none" for a task learned before calibrated scores.')
    temperature: float = Field(description="The task's logits are divided by it (1: scores as the module gives them).")
    ece_before: float | None = Field(None, description="Expected calibration error (top label, 15 bins) of the raw "
                                                       "scores on the task's evaluation set.")
    ece_after: float | None = Field(None, description="The same for the scores as served.")
    ece_floor: float | None = Field(None, description="About what perfectly calibrated scores would show on a set "
                                                      "this size.")
    ece_examples: int | None = Field(None, description="Evaluation examples the ECE was measured on.")


class TaskSummary(BaseModel):
    # Later versions' records may say more; a NaN would be sent as JSON null where a number is promised.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str
    labels: list[str]
    accuracy: float | None = Field(None, description="Accuracy on the task's evaluation set, measured by this version.")
    learned_accuracy: float | None = Field(None, description="Accuracy when the task was (last) learned.")
    probe_accuracy: float | None = Field(None, description="The logistic-regression probe's accuracy (reference line).")
    examples: dict[str, int] = Field(default_factory=dict, description="Training, held-out and evaluation examples.")
    calibration: TaskCalibration | None = Field(
        None, description="How the task's scores are calibrated; null for versions registered before calibrated scores.")


class TasksDocument(BaseModel):
    version: str = Field(description="The served model version's tag.")
    tasks: list[TaskSummary]


class PrecisionDocument(BaseModel):
    setting: str = Field(description="What CTT_PRECISION asked for.")
    tasks: dict[str, str] = Field(description="The precision each task is served in.")
    evidence: dict[str, dict] = Field(
        default_factory=dict, description="Per task, why it is served in the requested precision or in fp32: the "
                                          "examples only fp32 and only the fast path classified right, the accuracy "
                                          "loss and the rule applied.")


class ModelCard(BaseModel):
    tag: str
    parent: str | None
    created: str
    labels: dict[str, str]
    backbone: dict[str, Any] = Field(description="The frozen encoder: spec, digest, sizes.")
    max_length: int = Field(description="Tokens read per text.")
    task_count: int
    metrics: dict[str, Any] = Field(description="mean_accuracy, bwt, mean_forgetting and accuracy per task.")
    environment: str
    precision: PrecisionDocument


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    model: str
    environment: str
    ready_workers: int
    workers: int
    problem: str | None = None


class SourceStats(BaseModel):
    rows: int
    with_prediction: int
    agreed: int
    agreement: float | None


class VersionFeedbackStats(BaseModel):
    version: str | None = Field(description="The version that served the predictions (null: stored without one).")
    served: bool = Field(description="Whether this is the version serving now.")
    rows: int
    first: str | None
    last: str | None
    sources: dict[str, SourceStats]


class TaskFeedbackStats(BaseModel):
    task: str
    rows: int
    first: str | None
    last: str | None
    version_accuracy: float | None
    sources: dict[str, SourceStats]
    versions: list[VersionFeedbackStats] = Field(default_factory=list, description=(
        "The same per version that served the predictions, the served one first."))


class FeedbackStats(BaseModel):
    version: str
    since: str | None = Field(description="Where the window starts: on a whole hour at or before the asked moment.")
    granularity_s: float | None = Field(None, description="How finely windows are cut (they start on a whole hour).")
    tasks: list[TaskFeedbackStats]
