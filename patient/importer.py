"""Import patients from files into the Patient Service.

    python -m patient.importer [--config config.yml] [--report PATH]
        [--batch-size N] [--timeout S] PATH...

Records go to ``patient_service.register_patients`` in batches, each with an
idempotency key made from its content: running the import again on the same
files creates nothing new. The console shows counts only; each record that
was not stored (a duplicate, a rejected record) gets a line in the report,
with where it came from and why.
"""

import argparse
import collections
import hashlib
import json
import logging
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError
from nameko.cli.main import setup_yaml_parser
from nameko.exceptions import RemoteError, RpcTimeout, UnknownService
from nameko.standalone.rpc import ClusterRpcProxy
from tqdm import tqdm

# Importing the errors module registers its types with Nameko, so that the
# service's errors arrive as themselves and not as RemoteError.
from patient import errors, sources

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "config.yml"
DEFAULT_BATCH_SIZE = 100
MAX_BATCH_SIZE = 100
DEFAULT_TIMEOUT_S = 60.0
# Batches sent before the oldest one's answer is awaited: the service
# validates one while the database writes another, and this process reads
# the next meanwhile.
IN_FLIGHT = 2
KEY_PREFIX = "import:"

# Errors that say the service cannot be reached now, as opposed to errors it
# answers with.
UNREACHABLE = (
    UnknownService,
    RpcTimeout,
    errors.ServiceUnavailable,
    OSError,
    AMQPError,
    OperationalError,
)

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2


class ServiceUnreachable(Exception):
    """The broker or the service cannot be reached, or did not answer."""


class ServiceFailed(Exception):
    """The service answered a batch with an error of its own."""


@dataclass
class Summary:
    files: int = 0
    records: int = 0
    created: int = 0
    replayed: int = 0
    duplicates: int = 0
    rejected: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def rate(self):
        return self.records / self.seconds if self.seconds else 0.0

    def lines(self):
        return [
            f"files read         {self.files:8}",
            f"records read       {self.records:8}",
            f"  created          {self.created:8}",
            f"  already imported {self.replayed:8}",
            f"  duplicates       {self.duplicates:8}",
            f"  rejected         {self.rejected:8}",
            f"  skipped          {self.skipped:8}  (not Patient resources)",
            f"took {self.seconds:.1f} s, {self.rate:.0f} records/s",
        ]


def import_key(resource):
    """The idempotency key of a resource: the same content, the same key."""
    canonical = json.dumps(
        resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def load_config(path):
    """A Nameko config file, with ``${VAR:default}`` taken from the
    environment as ``nameko run`` does."""
    setup_yaml_parser()
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file) or {}


def run_import(
    paths,
    config,
    report_path,
    batch_size=DEFAULT_BATCH_SIZE,
    timeout=DEFAULT_TIMEOUT_S,
    progress=False,
):
    """Import every record of ``paths``; return the counts.

    Raises ``ServiceUnreachable`` or ``ServiceFailed`` if the run could not
    finish; running it again resumes where it stopped.
    """
    started = time.monotonic()
    with (
        _cluster(config, timeout) as cluster,
        open(report_path, "w", encoding="utf-8") as report_file,
        tqdm(unit=" records", file=sys.stderr, disable=not progress) as bar,
    ):
        run = _Run(cluster.patient_service, _Report(report_file), bar, config, timeout)
        run.call("ping")
        for batch in _batches(run.patients(paths), batch_size):
            run.send(batch)
        run.finish()
    run.summary.seconds = time.monotonic() - started
    log.info("import finished: %s records", run.summary.records)
    return run.summary


@contextmanager
def _cluster(config, timeout):
    proxy = ClusterRpcProxy(config, timeout=timeout)
    try:
        cluster = proxy.start()
    except UNREACHABLE as exc:
        raise ServiceUnreachable(_why_unreachable(exc, config, timeout)) from None
    try:
        yield cluster
    finally:
        # Closing a connection the broker has already dropped fails; the
        # reason it dropped is what the caller needs to see.
        with suppress(OSError, AMQPError, OperationalError):
            proxy.stop()


def _why_unreachable(exc, config, timeout):
    if isinstance(exc, UnknownService):
        return "the patient service is not running (no one serves patient_service)"
    if isinstance(exc, RpcTimeout):
        return f"the patient service did not answer within {timeout:g} s"
    if isinstance(exc, errors.ServiceUnavailable):
        # Its database is down or slow; smaller batches help the latter.
        hint = "a smaller --batch-size may help"
        return f"the patient service is unavailable ({exc}); {hint}"
    return f"cannot reach the broker at {_broker(config)} ({type(exc).__name__})"


def _broker(config):
    """Host and port of the broker, without the credentials in its URI."""
    try:
        parts = urlsplit(config.get("AMQP_URI") or "")
        return f"{parts.hostname}:{parts.port or 5672}"
    except ValueError:
        return "the configured AMQP_URI"


def _batches(records, size):
    records = iter(records)
    while batch := list(islice(records, size)):
        yield batch


class _Run:
    """One import: reads records, sends them, counts and reports outcomes."""

    def __init__(self, service, report, bar, config, timeout):
        self.service = service
        self.report = report
        self.bar = bar
        self.config = config
        self.timeout = timeout
        self.summary = Summary()
        self.in_flight = collections.deque()

    def patients(self, paths):
        """The Patient records of ``paths``; the others are counted here."""
        for path, name in sources.find_files(paths):
            self.summary.files += 1
            for record in sources.read_file(path, name):
                self.summary.records += 1
                if record.resource is not None:
                    yield record
                    continue
                if record.skipped:
                    self.summary.skipped += 1
                else:
                    self.summary.rejected += 1
                    self.report.write(record.ref, "rejected", record.problem)
                self.bar.update()

    def send(self, batch):
        """Send a batch; tally the oldest in flight once ``IN_FLIGHT`` are.

        A batch that shares an identifier or a key with one in flight waits
        for it: of two such records, the one read first is the one stored,
        as when batches go one at a time.
        """
        entries = [
            {"resource": r.resource, "idempotency_key": import_key(r.resource)}
            for r in batch
        ]
        claims = _claims(entries)
        if any(claims & held for _, _, held in self.in_flight):
            self.finish()
        send = self.service.register_patients.call_async
        self.in_flight.append((batch, self._guarded(send, entries), claims))
        if len(self.in_flight) >= IN_FLIGHT:
            self._tally_batch(*self.in_flight.popleft())

    def finish(self):
        while self.in_flight:
            self._tally_batch(*self.in_flight.popleft())

    def _tally_batch(self, batch, reply, _claims):
        results = self._guarded(reply.result)
        for record, result in zip(batch, results, strict=True):
            self._tally(record, result)
        self.bar.update(len(batch))

    def call(self, method, *args):
        return self._guarded(getattr(self.service, method), *args)

    def _guarded(self, function, *args):
        """Call the service; its failures become the import's own errors."""
        try:
            return function(*args)
        except UNREACHABLE as exc:
            why = _why_unreachable(exc, self.config, self.timeout)
            raise ServiceUnreachable(why + self._resume()) from None
        except errors.PatientServiceError as exc:
            why = f"the patient service failed ({exc})"
            raise ServiceFailed(why + self._resume()) from None
        except RemoteError as exc:
            why = f"the patient service failed ({exc.exc_type})"
            raise ServiceFailed(why + self._resume()) from None

    def _resume(self):
        if not self.summary.records:
            return ""
        return f", after reading {self.summary.records} records; run it again to go on"

    def _tally(self, record, result):
        status = result.get("status")
        if status == "created":
            self.summary.created += 1
        elif status == "replayed":
            self.summary.replayed += 1
        elif status == "duplicate":
            self.summary.duplicates += 1
            self.report.write(
                record.ref,
                "duplicate",
                "an identifier is held by another patient",
                existing_id=result.get("existing_id"),
                system=result.get("system"),
            )
        elif status == "invalid":
            self.summary.rejected += 1
            self.report.write(
                record.ref,
                "rejected",
                "not a valid R4 Patient",
                errors=result.get("errors"),
            )
        else:
            self.summary.rejected += 1
            self.report.write(record.ref, "rejected", f"refused ({status})")


def _claims(entries):
    """The identifiers and idempotency keys of a batch's entries."""
    claims = {("key", e["idempotency_key"]) for e in entries}
    for entry in entries:
        identifiers = entry["resource"].get("identifier")
        for identifier in identifiers if isinstance(identifiers, list) else ():
            if not isinstance(identifier, dict):
                continue
            pair = identifier.get("system"), identifier.get("value")
            if all(isinstance(part, str) for part in pair):
                claims.add(("id", *pair))
    return claims


class _Report:
    """JSON lines, one for each record that was not stored."""

    def __init__(self, file):
        self.file = file

    def write(self, ref, status, reason, **details):
        line = {"ref": ref, "status": status, "reason": reason, **details}
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")


def default_report_path():
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"import-report-{stamp}.jsonl")


def main(argv=None):
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        config = load_config(args.config)
    except OSError as exc:
        return _fail(f"cannot read the config file {args.config} ({exc.strerror})")
    except yaml.YAMLError:
        return _fail(f"the config file {args.config} is not valid YAML")
    if not isinstance(config, dict) or not config.get("AMQP_URI"):
        return _fail(f"the config file {args.config} sets no AMQP_URI")

    report_path = args.report or default_report_path()
    try:
        summary = run_import(
            args.paths, config, report_path, args.batch_size, args.timeout, True
        )
    except ServiceUnreachable as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except ServiceFailed as exc:
        return _fail(str(exc))

    print("\n".join(summary.lines()))
    print(f"report: {report_path}")
    return EXIT_FINISHED


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m patient.importer",
        description="Import patients from FHIR JSON, FHIR NDJSON and Synthea CSV"
        " files, or from directories of them.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", type=_existing)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--report",
        type=Path,
        help="JSON lines report (default: import-report-<UTC time>.jsonl)",
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE, metavar="N"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for each answer of the service",
    )
    return parser


def _existing(value):
    if not Path(value).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {value}")
    return value


def _batch_size(value):
    size = int(value)
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BATCH_SIZE}")
    return size


def _positive(value):
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return number


def _setup_logging():
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # The broker client warns of a channel closing while a refused message is
    # returned; the import reports that case itself.
    logging.getLogger("amqp").setLevel(logging.ERROR)


def _fail(message, code=EXIT_FAILED):
    print(f"import stopped: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
