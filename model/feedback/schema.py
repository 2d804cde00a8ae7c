"""The feedback table, as SQLAlchemy 2 declarative models. Alembic migrations
(``migrations/versions``) create and change it; this module is what the code reads and writes.
A test checks that the migrated database matches these models."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SOURCES = ("review", "correction")  # a sampled, unbiased review; a user's correction (biased to errors)
DEFAULT_SOURCE = "correction"
KEY_MAX_CHARS = 128  # client ids and request ids
TASK_MAX_CHARS = 64  # model/ctt.py TASK_NAME_PATTERN
# Prefixes server-made keys, so they can never collide with a client's id.
SERVER_KEY_PREFIX = "srv:"


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
    model_tag: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # UTC, without a zone: SQLite has no zone-aware type and both databases then compare alike.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=False), nullable=False)

    __table_args__ = (
        Index("ix_ctt_feedback_task_id", "task", "id"),  # export and learn read one task in id order
        Index("ix_ctt_feedback_created_at", "created_at"),  # prune and stats --since
    )


feedback_table = FeedbackRow.__table__
