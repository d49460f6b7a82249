"""appointment requests, their outbox, audit of requests

Revision ID: 5d1e7a3b9c20
Revises: cc0522f49c55
Create Date: 2026-12-04 18:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "5d1e7a3b9c20"
down_revision: Union[str, Sequence[str], None] = "cc0522f49c55"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "appointment_requests",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("patient_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("preferred_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("preferred_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ticket_id", sa.Text(), nullable=True),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("cancellation", sa.String(length=16), nullable=True),
        sa.Column("failure_reason", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(
            "preferred_start < preferred_end",
            name="ck_appointment_requests_preferred_window",
        ),
    )
    op.create_index(
        "ix_appointment_requests_patient_id",
        "appointment_requests",
        ["patient_id", "created_at", "id"],
        unique=False,
    )
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.UUID(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("maybe_delivered", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["appointment_requests.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_outbox_messages_next_attempt_at",
        "outbox_messages",
        ["next_attempt_at"],
        unique=False,
    )
    op.create_index(
        "uq_outbox_messages_request_id_action",
        "outbox_messages",
        ["request_id", "action"],
        unique=True,
    )
    op.add_column("audit_events", sa.Column("request_id", sa.UUID(), nullable=True))
    op.alter_column(
        "audit_events",
        "action",
        existing_type=sa.String(length=16),
        type_=sa.String(length=32),
        existing_nullable=False,
    )


def downgrade() -> None:
    # Rows of appointment requests in the audit trail go with them; the
    # trigger keeps the table append-only, so it steps aside meanwhile.
    op.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
    op.execute("DELETE FROM audit_events WHERE request_id IS NOT NULL")
    op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
    op.alter_column(
        "audit_events",
        "action",
        existing_type=sa.String(length=32),
        type_=sa.String(length=16),
        existing_nullable=False,
    )
    op.drop_column("audit_events", "request_id")
    op.drop_index("uq_outbox_messages_request_id_action", table_name="outbox_messages")
    op.drop_index("ix_outbox_messages_next_attempt_at", table_name="outbox_messages")
    op.drop_table("outbox_messages")
    op.drop_index(
        "ix_appointment_requests_patient_id", table_name="appointment_requests"
    )
    op.drop_table("appointment_requests")
