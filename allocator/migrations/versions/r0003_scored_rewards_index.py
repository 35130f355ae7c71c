"""Index of the rewards that carry a prediction score, by experiment, variant and time.

Start-up rebuilds each variant's prediction-score windows from the log with it (the last
few thousand scored rewards per variant and period), instead of scanning every reward of
the experiment. Partial: rewards without a score (most of them) cost it nothing.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_SCORED = sa.text("prediction_score IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_rewards_scored",
        "rewards",
        ["experiment_id", "arm", "received_at"],
        sqlite_where=_SCORED,
        postgresql_where=_SCORED,
    )


def downgrade() -> None:
    op.drop_index("ix_rewards_scored", table_name="rewards")
