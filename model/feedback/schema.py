"""The feedback tables, as SQLAlchemy 2 declarative models. Alembic migrations
(``migrations/versions``) create and change them; this module is what the code reads and writes.
A test checks that the migrated database matches these models.

``ctt_feedback`` holds the rows; ``ctt_feedback_counts`` holds what ``/feedback/stats`` reads:
per task, served version and source, the rows, rows with a served prediction and agreements, in
hourly and daily buckets and one all-time bucket. Every change to the rows changes the counts in
the same transaction (model/feedback/database.py), so a stats call reads a few count rows
whatever the size of the table."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, DateTime, Index, Integer, PrimaryKeyConstraint, SmallInteger, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SOURCES = ("review", "correction")  # a sampled, unbiased review; a user's correction (biased to errors)
DEFAULT_SOURCE = "correction"
REVIEW_SOURCE = "review"
KEY_MAX_CHARS = 128  # client ids and request ids
TASK_MAX_CHARS = 64  # model/ctt.py TASK_NAME_PATTERN
MODEL_TAG_MAX_CHARS = 200
# The credential that sent a row ("key:web-frontend", "jwt:alice"; never a secret). Longer ids, or
# ids a database cannot store, are kept as a readable prefix and a digest (``storable_principal``).
PRINCIPAL_MAX_CHARS = 200
# Prefixes server-made keys, so they can never collide with a client's id.
SERVER_KEY_PREFIX = "srv:"

# Count buckets: ``span`` and the length of its buckets. The all-time bucket starts at ALL_TIME.
HOUR, DAY, ALL = "hour", "day", "all"
SPANS = {HOUR: timedelta(hours=1), DAY: timedelta(days=1)}
ALL_TIME = datetime(1970, 1, 1)
NO_TAG = ""  # the counts' model_tag for rows stored without one (a key column cannot be NULL)

# What no supported database can store in a text column: PostgreSQL refuses NUL in text, and
# neither database can encode an unpaired UTF-16 surrogate. Refused on every database, so a row
# accepted in development (SQLite) is storable in production (PostgreSQL).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored in every supported database, or None."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    return "contains an unpaired UTF-16 surrogate (not valid Unicode)"


def bucket_start(moment: datetime, span: str) -> datetime:
    """The start of the ``span`` bucket holding ``moment`` (UTC, no zone)."""
    if span == ALL:
        return ALL_TIME
    if span == DAY:
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


class Base(DeclarativeBase):
    pass


class FeedbackRow(Base):
    """One label a user or reviewer gave a text of one task."""

    __tablename__ = "ctt_feedback"

    # SQLite autoincrements only INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    # The client's id, or a server-made one: every row has a unique key, so a retried insert (by
    # the client, or by the server after a dropped connection) can never store a row twice.
    key: Mapped[str] = mapped_column(String(KEY_MAX_CHARS + 8), nullable=False, unique=True)
    task: Mapped[str] = mapped_column(String(TASK_MAX_CHARS), nullable=False)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    label: Mapped[str] = mapped_column(Text, nullable=False)
    prediction: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(KEY_MAX_CHARS), nullable=True)
    model_tag: Mapped[str | None] = mapped_column(String(MODEL_TAG_MAX_CHARS), nullable=True)
    # UTC, without a zone: SQLite has no zone-aware type and both databases then compare alike.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)
    # Who sent it; NULL for rows stored before credentials were recorded (migration 0002).
    principal: Mapped[str | None] = mapped_column(String(PRINCIPAL_MAX_CHARS), nullable=True)

    __table_args__ = (
        Index("ix_ctt_feedback_task_id", "task", "id"),  # export and learn read one task in id order
        Index("ix_ctt_feedback_created_at", "created_at"),  # prune
        Index("ix_ctt_feedback_principal", "principal"),  # list and purge a revoked credential's rows
    )


class FeedbackCount(Base):
    """How many rows one bucket of time holds, per task, served version and source."""

    __tablename__ = "ctt_feedback_counts"

    span: Mapped[str] = mapped_column(String(8), nullable=False)  # hour, day or all
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)
    task: Mapped[str] = mapped_column(String(TASK_MAX_CHARS), nullable=False)
    model_tag: Mapped[str] = mapped_column(String(MODEL_TAG_MAX_CHARS), nullable=False)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    # Concurrent writers of one task add to different shards of its buckets, so they do not wait
    # for each other's commits (model/feedback/counts.py); readers sum the shards.
    shard: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    with_prediction: Mapped[int] = mapped_column(BigInteger, nullable=False)
    agreed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    first_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)
    last_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)

    # Reads take one span and a range of bucket starts: the key's order serves them.
    __table_args__ = (PrimaryKeyConstraint("span", "bucket_start", "task", "model_tag", "source", "shard",
                                           name="pk_ctt_feedback_counts"),)


feedback_table = FeedbackRow.__table__
counts_table = FeedbackCount.__table__
