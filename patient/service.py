"""The ``patient_service`` Nameko service: a thin adapter from RPC calls
and HTTP requests to the plain modules that hold the rules."""

import logging
from datetime import UTC, datetime, timedelta

from nameko.dependency_providers import Config
from nameko.timer import timer

# The module, not the class: `nameko run` would take a class with
# entrypoints found here for a service of its own.
from patient import api, appointments, health, outbox, records, relay, search
from patient.db import PatientDatabase
from patient.dependencies import ONE_RESOURCE_BYTES, CallerProvider, rpc, setting_timer
from patient.models import Base
from patient.queue import QueueServiceRpc

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 3600


class PatientService(api.PatientApi):
    """RPC methods here; the HTTP routes come from ``PatientApi``."""

    name = "patient_service"

    db = PatientDatabase(Base)
    caller = CallerProvider()
    config = Config()
    queue_service = QueueServiceRpc()

    @property
    def region(self):
        return self.config.get("PHONE_REGION") or None

    @property
    def forward_policy(self):
        return outbox.Policy.from_config(self.config)

    @rpc(sensitive_arguments=("patient",), max_request_bytes=ONE_RESOURCE_BYTES)
    def register_patient(self, patient, idempotency_key=None):
        return records.register_patient(
            self.db.session, patient, self.caller, idempotency_key, self.region
        )

    @rpc(sensitive_arguments=("entries",))
    def register_patients(self, entries):
        return records.register_patients(
            self.db.session, entries, self.caller, self.region
        )

    @rpc
    def get_patient(self, patient_id):
        return records.get_patient(self.db.session, patient_id)

    @rpc(sensitive_arguments=("system", "value"))
    def find_patient_by_identifier(self, system, value):
        return records.find_patient_by_identifier(self.db.session, system, value)

    @rpc(sensitive_arguments=("patient",), max_request_bytes=ONE_RESOURCE_BYTES)
    def update_patient(self, patient_id, patient, expected_version):
        return records.update_patient(
            self.db.session,
            patient_id,
            patient,
            expected_version,
            self.caller,
            self.region,
        )

    @rpc
    def deactivate_patient(self, patient_id, expected_version=None):
        return records.deactivate_patient(
            self.db.session, patient_id, self.caller, expected_version, self.region
        )

    @rpc(sensitive_arguments=("criteria",))
    def search_patients(self, criteria, count=20, cursor=None):
        return search.search_patients(
            self.db.session, criteria, count, cursor, self.region, encoded=True
        )

    @rpc(sensitive_arguments=("request",))
    def request_appointment(self, patient_id, request, idempotency_key=None):
        made = appointments.request_appointment(
            self.db.session, patient_id, request, self.caller, idempotency_key
        )
        return self.forward_new_request(made)

    def forward_new_request(self, made):
        """Forward a request right after its commit (RPC and HTTP alike); the
        outbox relay retries what this does not get through."""
        if made["status"] != appointments.PENDING:
            return made
        return relay.forward_now(
            self.db.session, self.queue_service, self.forward_policy, made
        )

    @rpc
    def get_appointment_request(self, request_id):
        return appointments.get_appointment_request(self.db.session, request_id)

    @rpc
    def list_appointment_requests(self, patient_id, status=None, count=20, cursor=None):
        return appointments.list_appointment_requests(
            self.db.session, patient_id, status, count, cursor
        )

    @rpc
    def cancel_appointment_request(self, request_id):
        return appointments.cancel_appointment_request(
            self.db.session, request_id, self.caller
        )

    @setting_timer("OUTBOX_RELAY_INTERVAL_S", 1.0)
    def relay_outbox(self):
        """Forward what the Queue Service is still owed."""
        try:
            relay.relay_due(self.db.session, self.queue_service, self.forward_policy)
        except Exception as exc:  # the next tick tries again
            log.warning("outbox relay failed: %s", type(exc).__name__)
            self.db.session.invalidate()

    @rpc
    def ping(self):
        """Touches nothing: the floor of an RPC round trip."""
        return "pong"

    @rpc
    def health(self):
        return self.health_report()

    def health_report(self):
        deadline = float(self.config.get("CALL_DEADLINE_S", 8))
        return health.report(
            self.db.session, self.config["AMQP_URI"], deadline, self.queue_service
        )

    @timer(interval=PURGE_INTERVAL_S)
    def purge_delivery_records(self):
        hours = float(self.config.get("DELIVERY_RECORD_RETENTION_H", 24))
        cutoff = datetime.now(UTC) - timedelta(hours=hours)
        try:
            deleted = records.purge_delivery_records(self.db.session, cutoff)
        except Exception as exc:  # the next tick tries again
            log.warning("purge of delivery records failed: %s", type(exc).__name__)
            return
        log.info("purged %s delivery records", deleted)
