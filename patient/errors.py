"""Every error a caller of the Patient Service can receive.

Each type is registered with Nameko so that a Python caller that imports this
module gets the same type back, with the same arguments, instead of a
``RemoteError``. Messages and arguments carry ids, field paths and rules,
never the values a caller sent: they end up in logs.
"""

from nameko.exceptions import deserialize_to_instance


class PatientServiceError(Exception):
    """Base of the errors this service raises on purpose."""

    code = "error"

    def __init__(self, message, *details):
        super().__init__(message, *details)
        self.message = message

    def __str__(self):
        return self.message


class InvalidFields(PatientServiceError):
    """Input that breaks rules; ``errors`` maps a field path to messages."""

    def __init__(self, errors):
        super().__init__(_summarise(errors))
        self.args = (errors,)
        self.errors = errors


@deserialize_to_instance
class PatientNotFound(PatientServiceError):
    """No patient with that id, or with that identifier (``patient_id`` is
    then empty)."""

    code = "patient-not-found"

    def __init__(self, patient_id=""):
        what = f"id {patient_id}" if patient_id else "that id or identifier"
        super().__init__(f"no patient with {what}")
        self.args = (patient_id,)
        self.patient_id = patient_id


@deserialize_to_instance
class InvalidPatient(InvalidFields):
    """The resource breaks a rule; ``errors`` maps a field path to messages."""

    code = "invalid-patient"


@deserialize_to_instance
class InvalidSearch(InvalidFields):
    code = "invalid-search"


@deserialize_to_instance
class InvalidRequest(InvalidFields):
    """An argument other than the resource is malformed."""

    code = "invalid-request"


@deserialize_to_instance
class DuplicatePatient(PatientServiceError):
    """An identifier of the resource is held by another patient."""

    code = "duplicate-patient"

    def __init__(self, existing_id, system=""):
        # Nameko sends arguments as strings (None would arrive as "None").
        system = system or ""
        where = f" (identifier system {system})" if system else ""
        super().__init__(f"identifier already held by patient {existing_id}{where}")
        self.args = (existing_id, system)
        self.existing_id = existing_id
        self.system = system


@deserialize_to_instance
class VersionConflict(PatientServiceError):
    code = "version-conflict"

    def __init__(self, patient_id, expected_version, current_version):
        # Versions are strings, as FHIR's meta.versionId and as Nameko sends
        # arguments.
        expected_version, current_version = str(expected_version), str(current_version)
        super().__init__(
            f"patient {patient_id} is at version {current_version}, "
            f"not {expected_version}"
        )
        self.args = (patient_id, expected_version, current_version)
        self.patient_id = patient_id
        self.expected_version = expected_version
        self.current_version = current_version


@deserialize_to_instance
class IdempotencyKeyReused(PatientServiceError):
    code = "idempotency-key-reused"

    def __init__(self, message="idempotency key already used for another request"):
        super().__init__(message)


@deserialize_to_instance
class PatientInactive(PatientServiceError):
    """The patient is deactivated: no new appointment requests."""

    code = "patient-inactive"

    def __init__(self, patient_id):
        super().__init__(f"patient {patient_id} is inactive")
        self.args = (patient_id,)
        self.patient_id = patient_id


@deserialize_to_instance
class InvalidAppointmentRequest(InvalidFields):
    """The appointment request breaks a rule; ``errors`` maps a field to
    messages."""

    code = "invalid-appointment-request"


@deserialize_to_instance
class AppointmentRequestNotFound(PatientServiceError):
    code = "appointment-request-not-found"

    def __init__(self, request_id=""):
        what = f"id {request_id}" if request_id else "that id"
        super().__init__(f"no appointment request with {what}")
        self.args = (request_id,)
        self.request_id = request_id


@deserialize_to_instance
class AppointmentNotCancellable(PatientServiceError):
    """The request ended without reaching the Queue Service (``failed``):
    there is nothing to cancel."""

    code = "appointment-not-cancellable"

    def __init__(self, request_id, status):
        super().__init__(f"appointment request {request_id} is {status}")
        self.args = (request_id, status)
        self.request_id = request_id
        self.status = status


@deserialize_to_instance
class ServiceUnavailable(PatientServiceError):
    """A dependency the call needs (the database) cannot be reached now."""

    code = "service-unavailable"

    def __init__(self, message="the patient database is unavailable; retry later"):
        super().__init__(message)


@deserialize_to_instance
class InternalError(PatientServiceError):
    """Something unexpected failed; ``reference`` finds it in the logs."""

    code = "internal-error"

    def __init__(self, reference):
        super().__init__(f"internal error, reference {reference}")
        self.args = (reference,)
        self.reference = reference


# What a caller can be told about: logged as warnings, not as crashes.
EXPECTED_ERRORS = (
    PatientNotFound,
    InvalidPatient,
    InvalidSearch,
    InvalidRequest,
    DuplicatePatient,
    VersionConflict,
    IdempotencyKeyReused,
    PatientInactive,
    InvalidAppointmentRequest,
    AppointmentRequestNotFound,
    AppointmentNotCancellable,
    ServiceUnavailable,
)


def _summarise(errors):
    # Only a count: a field path can itself be caller-chosen text (an unknown
    # element's name), and messages are logged. The paths are in ``errors``.
    count = len(errors) if isinstance(errors, dict) else 0
    return f"invalid input in {count} field{'s' if count != 1 else ''}"
