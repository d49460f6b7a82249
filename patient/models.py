"""Tables of the patient database. Alembic migrations build them; the
service never calls ``create_all``."""

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Index keys compare byte-wise: prefix searches (LIKE 'abc%') then use a plain
# b-tree whatever the database's default collation is.
C = "C"


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """The current version of each patient; ``resource`` is what callers get."""

    __tablename__ = "patients"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    # json, not jsonb: the text is kept as written, so a number such as -0.0
    # or 1e300 comes back as the caller sent it. Nothing queries inside it.
    resource: Mapped[dict] = mapped_column(JSON, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False)
    gender: Mapped[str | None] = mapped_column(String(16))
    birth_date_start: Mapped[date | None] = mapped_column(Date)
    birth_date_end: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PatientIdentifier(Base):
    """Identifiers of the current version. Only those with a system and a
    value are unique (``enforced``); the others are kept for search."""

    __tablename__ = "patient_identifiers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("patients.id"), nullable=False
    )
    system: Mapped[str | None] = mapped_column(Text(collation=C))
    value: Mapped[str | None] = mapped_column(Text(collation=C))

    __table_args__ = (
        Index(
            "uq_patient_identifiers_system_value",
            "system",
            "value",
            unique=True,
            postgresql_where=text("system IS NOT NULL AND value IS NOT NULL"),
        ),
        Index("ix_patient_identifiers_value", "value"),
        Index("ix_patient_identifiers_patient_id", "patient_id"),
    )


class PatientNameToken(Base):
    """Folded (case- and accent-free) parts of names, for prefix search."""

    __tablename__ = "patient_name_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("patients.id"), nullable=False
    )
    part: Mapped[str] = mapped_column(String(8), nullable=False)
    token: Mapped[str] = mapped_column(Text(collation=C), nullable=False)

    __table_args__ = (
        Index("ix_patient_name_tokens_part_token", "part", "token", "patient_id"),
        Index("ix_patient_name_tokens_patient_id", "patient_id"),
    )


class PatientTelecom(Base):
    """Search keys of phone numbers and e-mail addresses."""

    __tablename__ = "patient_telecoms"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("patients.id"), nullable=False
    )
    system: Mapped[str] = mapped_column(String(8), nullable=False)
    key: Mapped[str] = mapped_column(Text(collation=C), nullable=False)

    __table_args__ = (
        Index("ix_patient_telecoms_system_key", "system", "key", "patient_id"),
        Index("ix_patient_telecoms_patient_id", "patient_id"),
    )


class IdempotencyRecord(Base):
    """The first answer to a keyed write, replayed when the key returns.

    A key is either the caller's ``idempotency_key`` or, without one, the AMQP
    correlation id of the message, so a redelivered message is a replay.
    """

    __tablename__ = "idempotency_records"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(Text(collation=C), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    patient_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    response: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_idempotency_records_created_at", "created_at"),)


class AuditEvent(Base):
    """One row for every change of a patient or of an appointment request,
    written in the same transaction as the change."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    # The appointment request changed, for its actions (``appointment-*``).
    request_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    # The version of the patient, or of the appointment request.
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(Text, nullable=False)
    service: Mapped[str | None] = mapped_column(Text)
    call_id: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_audit_events_patient_id", "patient_id", "id"),)


class AppointmentRequest(Base):
    """A patient's request for an appointment, handed on to the Queue
    Service. ``reason`` is personal data: it never reaches a log."""

    __tablename__ = "appointment_requests"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    patient_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("patients.id"), nullable=False
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    priority: Mapped[str] = mapped_column(String(16), nullable=False)
    modality: Mapped[str] = mapped_column(String(16), nullable=False)
    preferred_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    preferred_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ticket_id: Mapped[str | None] = mapped_column(Text)
    queue_position: Mapped[int | None] = mapped_column(Integer)
    # For a cancelled request the Queue Service may hold: whether it has
    # confirmed the cancellation (pending, confirmed, failed).
    cancellation: Mapped[str | None] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "ix_appointment_requests_patient_id",
            "patient_id",
            "created_at",
            "id",
        ),
        CheckConstraint(
            "preferred_start < preferred_end",
            name="ck_appointment_requests_preferred_window",
        ),
    )


class OutboxMessage(Base):
    """A call the Queue Service still owes an answer to, written in the
    same transaction as the change that needs it.

    ``next_attempt_at`` is both the schedule and the lease: a relay that
    claims the row moves it past the call's deadline, so a relay that dies
    mid-call leaves the row due again once the lease runs out.
    """

    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("appointment_requests.id"), nullable=False
    )
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # An attempt may have reached the Queue Service (it timed out, or is
    # under way): giving up then means telling it to cancel.
    maybe_delivered: Mapped[bool] = mapped_column(Boolean, nullable=False)
    last_error: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_outbox_messages_next_attempt_at", "next_attempt_at"),
        Index(
            "uq_outbox_messages_request_id_action", "request_id", "action", unique=True
        ),
    )
