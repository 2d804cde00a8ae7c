"""Alembic's entry point. CTT runs migrations itself (model/feedback/database.py ``migrate``),
on a connection that already holds the migration lock; this file only hands that connection to
Alembic. There is no offline (SQL script) mode."""

from alembic import context

from model.feedback.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through model.feedback.database.FeedbackDatabase.migrate(), "
                       "which holds the migration lock")
context.configure(connection=connection, target_metadata=Base.metadata,
                  version_table="ctt_alembic_version", render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
