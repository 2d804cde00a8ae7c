"""What the ``/feedback`` routes do, kept out of the HTTP glue: check that the caller may send
what it sends, store the rows with the caller's id, count them, answer the stats; and the start-up
rule that staging and production need a database.

The caller is a principal: an object with ``id`` (the credential's name, "key:web-frontend" or
"jwt:alice", never its secret) and ``permissions`` (a set of names). Feedback needs the
``feedback`` permission and ``review`` rows, the unbiased ones the live-accuracy alert trusts,
need ``review`` as well.

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
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import AbstractSet, Mapping, Protocol, Sequence

from model.errors import CTTError
from model.feedback.api import FeedbackAccepted, FeedbackMetrics, stats_document
from model.feedback.counts import GRANULARITY, window_start
from model.feedback.database import (FeedbackConflict, FeedbackDatabase, FeedbackInvalid, FeedbackItem,
                                     FeedbackUnavailable, normalise_url)
from model.feedback.schema import REVIEW_SOURCE

logger = logging.getLogger("ctt")

FEEDBACK_PERMISSION = "feedback"
REVIEW_PERMISSION = "review"
ANONYMOUS_ID = "anonymous"


class Principal(Protocol):
    """Who sends a request, as the service's authentication establishes it."""

    id: str
    permissions: AbstractSet[str]


@dataclass(frozen=True)
class _Anonymous:
    """The caller when the service runs without credentials (development, test): it may classify
    and send corrections, never reviews."""

    id: str = ANONYMOUS_ID
    permissions: frozenset[str] = frozenset({"classify", FEEDBACK_PERMISSION})


ANONYMOUS = _Anonymous()


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
    if FEEDBACK_PERMISSION not in principal.permissions:
        raise FeedbackForbidden(f"sending feedback needs the {FEEDBACK_PERMISSION!r} permission, which this "
                                "credential does not have; nothing was stored", FEEDBACK_PERMISSION,
                                list(range(len(items))))
    reviews = [index for index, item in enumerate(items) if item.source == REVIEW_SOURCE]
    if reviews and REVIEW_PERMISSION not in principal.permissions:
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

    def store(self, items: Sequence[FeedbackItem], principal: Principal | None = None) -> FeedbackAccepted:
        """Commit ``items`` with ``principal``'s id on each row (None: the anonymous caller of a
        service without credentials) and return after the commit; raises FeedbackForbidden,
        FeedbackInvalid, FeedbackConflict or FeedbackUnavailable, and then nothing is stored."""
        principal = principal or ANONYMOUS
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


__all__ = ["ANONYMOUS", "FEEDBACK_PERMISSION", "REVIEW_PERMISSION", "FeedbackConflict", "FeedbackEndpoint",
           "FeedbackForbidden", "FeedbackInvalid", "FeedbackUnavailable", "Principal", "check_permissions",
           "check_startup_database"]
