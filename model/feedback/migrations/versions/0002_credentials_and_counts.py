"""Record which credential sent each row; keep the counts that stats read.

Adds ``ctt_feedback.principal`` (NULL for the rows already stored: who sent them was not
recorded) with an index, creates ``ctt_feedback_counts`` and fills it from the rows already
stored, in the same transaction on PostgreSQL.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ctt_feedback") as table:
        table.add_column(sa.Column("principal", sa.String(200), nullable=True))
    op.create_index("ix_ctt_feedback_principal", "ctt_feedback", ["principal"])
    op.create_table(
        "ctt_feedback_counts",
        sa.Column("span", sa.String(8), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=False), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("model_tag", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("with_prediction", sa.BigInteger(), nullable=False),
        sa.Column("agreed", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=False), nullable=False),
        sa.PrimaryKeyConstraint("span", "bucket_start", "task", "model_tag", "source", "shard",
                                name="pk_ctt_feedback_counts"),
    )
    # The counting rule lives in one place; when the counts change shape, a later migration
    # recounts with its own rule (this one then needs a frozen copy of today's).
    from model.feedback.counts import recount

    recount(op.get_bind())


def downgrade() -> None:
    op.drop_table("ctt_feedback_counts")
    op.drop_index("ix_ctt_feedback_principal", "ctt_feedback")
    with op.batch_alter_table("ctt_feedback") as table:
        table.drop_column("principal")
