"""The audit trail: one append-only row for every change."""

from sqlalchemy import insert

from patient.models import AuditEvent


def record(session, action, caller, now, patient_id, version, request_id=None):
    """Write the audit row of a change, in the change's transaction."""
    session.execute(
        insert(AuditEvent).values(
            patient_id=patient_id,
            request_id=request_id,
            action=action,
            version=version,
            occurred_at=now,
            actor=caller.actor,
            service=caller.service,
            call_id=caller.call_id,
        )
    )
