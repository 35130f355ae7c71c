"""Initial schema: experiments, reward log, counts, epochs, snapshots, audit, events, meta.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("lifecycle_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_experiments"),
        sa.UniqueConstraint("name", name="uq_experiments_name"),
    )
    op.create_index("ix_experiments_state", "experiments", ["state"])

    op.create_table(
        "rewards",
        sa.Column("replica_id", sa.String(64), nullable=False),
        sa.Column("replica_seq", sa.BigInteger(), nullable=False),
        sa.Column("dedup_key", sa.String(128), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("arm", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("prediction_score", sa.Double(), nullable=True),
        sa.Column("guardrails_json", sa.Text(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("replica_id", "replica_seq", name="pk_rewards"),
        sa.UniqueConstraint("dedup_key", name="uq_rewards_dedup_key"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"], name="fk_rewards_experiment_id_experiments"
        ),
    )
    op.create_index(
        "ix_rewards_experiment_id_replica_id_replica_seq",
        "rewards",
        ["experiment_id", "replica_id", "replica_seq"],
    )

    op.create_table(
        "assignment_counts",
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("arm", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "epoch", "arm", name="pk_assignment_counts"),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name="fk_assignment_counts_experiment_id_experiments",
        ),
    )

    op.create_table(
        "allocation_epochs",
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("shares_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "epoch", name="pk_allocation_epochs"),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name="fk_allocation_epochs_experiment_id_experiments",
        ),
    )

    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("positions_json", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"], name="fk_snapshots_experiment_id_experiments"
        ),
    )
    op.create_index("ix_snapshots_experiment_id_id", "snapshots", ["experiment_id", "id"])

    op.create_table(
        "audit",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=True),
        sa.Column("from_state", sa.String(32), nullable=True),
        sa.Column("to_state", sa.String(32), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("summary_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"], name="fk_audit_experiment_id_experiments"
        ),
    )
    op.create_index("ix_audit_experiment_id_seq", "audit", ["experiment_id", "seq"])

    op.create_table(
        "events",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("variant", sa.Integer(), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"], name="fk_events_experiment_id_experiments"
        ),
    )
    op.create_index("ix_events_experiment_id_seq", "events", ["experiment_id", "seq"])

    op.create_table(
        "meta",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )


def downgrade() -> None:
    for table in (
        "meta",
        "events",
        "audit",
        "snapshots",
        "allocation_epochs",
        "assignment_counts",
        "rewards",
        "experiments",
    ):
        op.drop_table(table)
