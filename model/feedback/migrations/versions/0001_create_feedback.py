"""Create the feedback table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ctt_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(136), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("prediction", sa.Text(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("model_tag", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.UniqueConstraint("key", name="uq_ctt_feedback_key"),
    )
    op.create_index("ix_ctt_feedback_task_id", "ctt_feedback", ["task", "id"])
    op.create_index("ix_ctt_feedback_created_at", "ctt_feedback", ["created_at"])


def downgrade() -> None:
    op.drop_table("ctt_feedback")
