"""What ``service.py``'s ``/feedback`` routes do, kept out of the BentoML glue: store the rows,
count them, answer the stats; and the start-up rule that staging and production need a database.

The database is opened lazily and migrated in the background when a worker starts: a database
that is down at start (or later) never stops the worker, ``/classify`` or readiness; feedback is
then a 503 with Retry-After until it is back."""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Mapping

from model.errors import CTTError
from model.feedback.api import FeedbackAccepted, FeedbackMetrics, stats_document
from model.feedback.database import FeedbackDatabase, FeedbackUnavailable, normalise_url

logger = logging.getLogger("ctt")


def check_startup_database(environment: str, fails_closed: bool, configured_url: str | None) -> None:
    """Fail closed like the credentials: outside development and test, pods have only per-pod
    scratch space, so feedback written to a local SQLite file would vanish with the pod."""
    if configured_url:
        normalise_url(configured_url)  # a malformed URL stops the start with one line
    elif fails_closed:
        raise CTTError(f"ENVIRONMENT={environment} needs a database for feedback: set DATABASE_URL_FILE "
                       "(a mounted Secret) or DATABASE_URL (postgresql+psycopg://...); a pod's own disk "
                       "does not outlive it")


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
                self.database._ensure_migrated()
            except Exception as exc:  # the database may be down: feedback answers 503 until it is back
                logger.warning(f"feedback database {self.database.public_url} not ready yet: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")

        thread = threading.Thread(target=migrate, name="ctt-feedback-migrate", daemon=True)
        thread.start()
        return thread

    def store(self, items) -> FeedbackAccepted:
        """Commit ``items`` (FeedbackItem) or raise FeedbackUnavailable; returns after the commit."""
        result = self.database.add(items, model_tag=self.version)
        self.metrics.record_stored(result.stored)
        return FeedbackAccepted(stored=len(result.stored), already_stored=result.already_stored)

    def stats(self, since: datetime | None) -> dict:
        return stats_document(self.database.stats(since), self.version, self.version_accuracy, since)


__all__ = ["FeedbackEndpoint", "FeedbackUnavailable", "check_startup_database"]
