"""The drills: each breaks one thing under a steady load, restores it, and
measures what callers saw and what the database holds afterwards."""

import contextlib
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import eventlet
from alembic import command
from alembic.config import Config as AlembicConfig
from nameko.standalone.rpc import ClusterRpcProxy

from drills import http
from drills.flood import Flood, malformed_requests
from drills.load import Load
from drills.relay import Relay
from drills.servers import ROOT, Postgres, Rabbit, Service, free_port

# Short deadlines keep the drills short; the rules are the same as with the
# defaults.
SETTINGS = {
    "CALL_DEADLINE_S": 3,
    "DB_STATEMENT_TIMEOUT_MS": 2000,
    "DB_CONNECT_TIMEOUT_S": 2,
    "DB_POOL_TIMEOUT_S": 2,
    "MAX_WORKERS": 10,
}
DEADLINE_S = SETTINGS["CALL_DEADLINE_S"]
# Scheduling and the round trip through the broker, on a busy 2-core machine.
MARGIN_S = 1.5
WARM_UP_S = 5


@dataclass
class Result:
    drill: str
    sent: int = 0
    acknowledged: int = 0
    found: int = 0
    duplicates: int = 0
    longest_stall: float = 0.0
    recovery: float | None = None
    measured: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d"))

    def expect(self, condition, failure):
        if not condition:
            self.failures.append(failure)


@dataclass
class Environment:
    workdir: Path
    postgres: Postgres
    rabbit: Rabbit

    @contextlib.contextmanager
    def service(self, db_port=None, amqp_port=None, **settings):
        http_port = free_port()
        service = Service(
            self.workdir,
            self.rabbit.uri_at(amqp_port),
            self.postgres.uri(port=db_port),
            **{
                **SETTINGS,
                **http.SETTINGS,
                "WEB_SERVER_ADDRESS": f"127.0.0.1:{http_port}",
                **settings,
            },
        )
        service.http = http.Http(http_port)
        service.start()
        try:
            yield service
        finally:
            service.stop()


@contextlib.contextmanager
def environment(keep=False):
    """A private PostgreSQL (migrated) and RabbitMQ in a temporary folder,
    removed afterwards unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix="patient-drills-"))
    workdir.chmod(0o755)
    postgres, rabbit = Postgres(workdir), Rabbit(workdir)
    try:
        postgres.init()
        postgres.start()
        postgres.create_database()
        config = AlembicConfig(str(ROOT / "alembic.ini"))
        config.attributes["db_uri"] = postgres.uri()
        command.upgrade(config, "head")
        rabbit.start()
        yield Environment(workdir, postgres, rabbit)
    finally:
        rabbit.destroy()
        postgres.destroy()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def database_stopped(env, outage_s=20):
    """Drill 1: PostgreSQL stopped for 20 s, then started."""
    result = Result("1. PostgreSQL stopped 20 s")
    with env.service() as service, Load(env.rabbit.uri) as load:
        eventlet.sleep(WARM_UP_S)
        pid = service.process.pid
        someone = f"/patients/{load.acknowledged[0]}"
        env.postgres.stop()
        down = time.monotonic()
        eventlet.sleep(2)
        health, _ = _probe(env, "health")
        over_http = [service.http.call("GET", path) for path in (someone, "/health")]
        eventlet.sleep(max(0, down + outage_s - time.monotonic()))
        env.postgres.start()
        up = time.monotonic()
        eventlet.sleep(5)
        after_http = service.http.call("GET", someone)
        eventlet.sleep(5)
        load.stop()
        result.expect(
            service.alive and service.process.pid == pid, "the service process died"
        )

    # Calls sent while the database was down and could not have been
    # answered before it was.
    outage = load.outcomes(since=down, until=up - DEADLINE_S)
    failed = [c for c in outage if c.outcome != "ok"]
    result.measured["calls during the outage"] = len(outage)
    result.measured["failed with ServiceUnavailable"] = sum(
        c.outcome == "ServiceUnavailable" for c in failed
    )
    result.measured["longest failed call during the outage (s)"] = _round(
        max((c.took for c in failed), default=0)
    )
    result.measured["health during the outage"] = _health_summary(health)
    result.measured["HTTP GET patient / GET health during the outage"] = [
        f"{status} {code or ''} in {took:.2f} s" for status, code, took in over_http
    ]
    result.measured["HTTP GET patient after"] = after_http[0]
    result.expect(
        [status for status, _, _ in over_http] == [503, 503]
        and over_http[0][1] == "service-unavailable"
        and all(took <= DEADLINE_S + MARGIN_S for _, _, took in over_http),
        "HTTP did not answer 503 within the deadline during the outage",
    )
    result.expect(after_http[0] == 200, "HTTP did not answer again after the outage")
    result.expect(
        failed and all(c.outcome == "ServiceUnavailable" for c in failed),
        "calls during the outage did not all fail with ServiceUnavailable",
    )
    result.expect(
        all(c.took <= DEADLINE_S + MARGIN_S for c in failed),
        "a call during the outage outlasted the deadline",
    )
    result.expect(
        isinstance(health, dict) and health["database"]["status"] == "down",
        "health() did not report the database down",
    )
    _finish(result, env, load, restored=up, recovery_limit=5)
    return result


def database_stalled(env, stall_s=20):
    """Drill 2: PostgreSQL accepting connections but not answering: a relay
    between the service and the database stops passing bytes on."""
    relay = Relay(env.postgres.port)
    try:
        return _unresponsive_database(
            Result("2. PostgreSQL stalled 20 s (relay)"),
            env,
            stall_s,
            freeze=lambda: setattr(relay, "paused", True),
            thaw=lambda: setattr(relay, "paused", False),
            db_port=relay.port,
        )
    finally:
        relay.close()


def backends_paused(env, pause_s=20):
    """Drill 2, the other way: the service's PostgreSQL backends SIGSTOPped,
    in the middle of whatever they were doing."""
    pids = []

    def freeze():
        pids.extend(
            pid
            for (pid,) in env.postgres.query(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = 'patient_service'"
            )
        )
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

    def thaw():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    result = Result("2b. PostgreSQL backends paused 20 s")
    _unresponsive_database(result, env, pause_s, freeze, thaw)
    result.measured["backends paused"] = len(pids)
    return result


def _unresponsive_database(result, env, seconds, freeze, thaw, db_port=None):
    with env.service(db_port=db_port) as service, Load(env.rabbit.uri) as load:
        eventlet.sleep(WARM_UP_S)
        frozen = time.monotonic()
        try:
            freeze()
            eventlet.sleep(2)
            health, _ = _probe(env, "health")
            pings = [_probe(env, "ping")[1] for _ in range(5)]
            eventlet.sleep(max(0, frozen + seconds - time.monotonic()))
        finally:
            thaw()
        thawed = time.monotonic()
        eventlet.sleep(10)
        load.stop()
        result.expect(service.alive, "the service process died")

    frozen_calls = load.outcomes(since=frozen, until=thawed)
    result.measured["calls while unresponsive"] = len(frozen_calls)
    result.measured["outcomes while unresponsive"] = _count(
        c.outcome for c in frozen_calls
    )
    result.measured["longest call while unresponsive (s)"] = _round(
        max((c.took for c in frozen_calls), default=0)
    )
    result.measured["ping while unresponsive, slowest (s)"] = _round(max(pings))
    result.measured["health while unresponsive"] = _health_summary(health)
    result.expect(
        all(c.took <= DEADLINE_S + MARGIN_S for c in frozen_calls),
        "a call outlasted the deadline",
    )
    result.expect(
        all(c.outcome in ("ok", "ServiceUnavailable") for c in frozen_calls),
        "a call failed with something else than ServiceUnavailable",
    )
    result.expect(max(pings) <= MARGIN_S, "ping waited for a stuck worker")
    _finish(result, env, load, restored=thawed, recovery_limit=5)
    return result


def broker_restarted(env):
    """Drill 3: RabbitMQ stopped and started again."""
    return _broker_down(Result("3. RabbitMQ restarted"), env, env.rabbit.stop)


def broker_crashed(env):
    """Drill 3, the other way: the RabbitMQ node SIGKILLed, then started."""
    result = Result("3b. RabbitMQ SIGKILLed, restarted")
    return _broker_down(result, env, env.rabbit.kill)


def _broker_down(result, env, take_down):
    with env.service() as service, Load(env.rabbit.uri) as load:
        eventlet.sleep(WARM_UP_S)
        pid = service.process.pid
        stopped = time.monotonic()
        take_down()
        env.rabbit.start()
        started = time.monotonic()
        result.measured["broker down (s)"] = _round(started - stopped)
        eventlet.sleep(15)
        load.stop()
        result.expect(
            service.alive and service.process.pid == pid, "the service process died"
        )
    hangs = sum(c.outcome == "Hang" for c in load.calls)
    result.measured["callers left hanging"] = hangs
    result.expect(hangs == 0, "a caller was left hanging")
    _finish(result, env, load, restored=started, recovery_limit=10)
    return result


def service_killed(env, kills=5):
    """Drill 4: the service SIGKILLed during registrations, then restarted."""
    result = Result(f"4. service SIGKILLed x{kills}")
    # The service reaches the broker through a relay, held for a moment
    # before each kill and cut with it: answers and acknowledgements of
    # requests the service has committed are lost with the process, as
    # when a machine dies, and those requests come back to the new one.
    relay = Relay(env.rabbit.port)
    with (
        contextlib.closing(relay),
        env.service(amqp_port=relay.port) as service,
        Load(env.rabbit.uri, registrars=5, readers=1, searchers=1) as load,
    ):
        eventlet.sleep(WARM_UP_S)
        kill_times, recoveries = [], []
        for _ in range(kills):
            relay.paused = True
            eventlet.sleep(0.3)
            killed = time.monotonic()
            service.kill(signal.SIGKILL)
            relay.drop()
            relay.paused = False
            # What the killed process wrote: patients it registered.
            written = service.log.read_text()
            kill_times.append((killed, written))
            service.start()
            eventlet.sleep(4)
            recoveries.append(load.recovery(killed))
        load.stop()

    # Sent before a kill and answered by the new process, from the first
    # delivery when the killed process had committed the registration.
    across = replayed = 0
    for registration in load.registrations.values():
        call = registration.answered
        for killed, written in kill_times:
            if call and call.started < killed < call.ended:
                across += 1
                replayed += f"registered patient {registration.patient_id}" in written
    result.measured["registration attempts"] = sum(
        r.attempts for r in load.registrations.values()
    )
    result.measured["registrations answered across a kill"] = across
    result.measured["of which committed by the killed process"] = replayed
    result.measured["from kill to calls answered again (s)"] = [
        _round(r) for r in recoveries
    ]
    result.expect(replayed > 0, "no kill came between a commit and its answer")
    _finish(result, env, load, restored=None)
    result.recovery = _round(max((r for r in recoveries if r is not None), default=0))
    return result


def many_slow_searches(env, searches=50, delay_s=0.2, idle_s=5):
    """Drill 5: 50 concurrent slow searches with MAX_WORKERS at 50."""
    result = Result("5. 50 slow searches, 50 workers")
    relay = Relay(env.postgres.port)
    try:
        with (
            env.service(
                db_port=relay.port, MAX_WORKERS=searches, DB_IDLE_TIMEOUT_S=idle_s
            ) as service,
            Load(env.rabbit.uri) as load,
        ):
            eventlet.sleep(WARM_UP_S)
            resting = max(_sample(env.postgres.service_connections, 5))
            relay.delay = delay_s
            burst = eventlet.GreenPool(searches)
            outcomes = list(burst.imap(lambda _: _probe_search(env), range(searches)))
            peak = env.postgres.service_connections()
            relay.delay = 0
            eventlet.sleep(idle_s + 5)
            after = env.postgres.service_connections()
            load.stop()
            log = service.log.read_text()
    finally:
        relay.close()

    exhausted = len(re.findall("no database connection free", log))
    result.measured["searches ok"] = sum(o == "ok" for o, _ in outcomes)
    result.measured["slowest search (s)"] = _round(max(t for _, t in outcomes))
    result.measured["pool exhaustion errors"] = exhausted
    result.measured["connections resting / peak / after"] = [resting, peak, after]
    result.expect(exhausted == 0, "the connection pool ran dry")
    result.expect(all(o == "ok" for o, _ in outcomes), "a slow search failed")
    result.expect(after <= resting, "connections stayed open after the burst")
    _finish(result, env, load, restored=None)
    return result


def malformed_flood(env, window_s=5):
    """Drill 6: malformed requests flood the RPC queue and the HTTP port."""
    result = Result("6. malformed flood (RPC and HTTP)")
    with env.service() as service, Load(env.rabbit.uri) as load:
        eventlet.sleep(WARM_UP_S)
        calm = time.monotonic()
        eventlet.sleep(window_s)
        flooding = time.monotonic()
        over_http = eventlet.spawn(http.flood, service.http)
        with Flood(env.rabbit.uri) as flood:
            for kind, body in malformed_requests():
                flood.send(kind, body)
            flood.collect(timeout=60)
        http_answers, http_as_expected = over_http.wait()
        flooded = time.monotonic()
        eventlet.sleep(window_s)
        load.stop()
        result.expect(service.alive, "the service process died")

    answers = flood.answers()
    result.measured["malformed requests"] = answers
    result.measured["malformed HTTP requests"] = http_answers
    result.expect(
        http_as_expected,
        "a malformed HTTP request got another answer than 400 or 413",
    )
    result.measured["flood answered in (s)"] = _round(flooded - flooding)
    speeds = {}
    for window, since, until in (
        ("before", calm, flooding),
        ("during", flooding, flooded),
        ("after", flooded, flooded + window_s),
    ):
        took = sorted(
            c.took for c in load.outcomes(since=since, until=until) if c.outcome == "ok"
        )
        speeds[window] = statistics.median(took)
        result.measured[f"ok calls {window} the flood, median / p95 (ms)"] = [
            round(speeds[window] * 1000, 1),
            round(took[int(len(took) * 0.95)] * 1000, 1),
        ]
    unanswered = sum(a["answers"].get("no answer", 0) for a in answers.values())
    accepted = sum(a["answers"].get("accepted", 0) for a in answers.values())
    result.expect(unanswered == 0, f"{unanswered} malformed requests got no answer")
    result.expect(accepted == 0, f"{accepted} malformed requests were accepted")
    # Calls queued behind the flood wait for it (one queue, in order); once
    # it is answered they are as fast as before.
    result.expect(
        speeds["after"] <= 2 * speeds["before"] + 0.05,
        "calls stayed slow after the flood",
    )
    _finish(result, env, load, restored=None)
    return result


def _sample(measure, seconds):
    samples = []
    for _ in range(int(seconds / 0.5)):
        samples.append(measure())
        eventlet.sleep(0.5)
    return samples


def _probe(env, method, *args):
    """One call on a proxy of its own: (answer or error, seconds)."""
    started = time.monotonic()
    try:
        with (
            eventlet.Timeout(30),
            ClusterRpcProxy({"AMQP_URI": env.rabbit.uri}, timeout=20) as rpc,
        ):
            answer = getattr(rpc.patient_service, method)(*args)
    except Exception as exc:
        answer = exc
    return answer, time.monotonic() - started


def _probe_search(env):
    answer, took = _probe(env, "search_patients", {"family": "drill"}, 20)
    return ("ok" if isinstance(answer, dict) else type(answer).__name__), took


def _health_summary(health):
    if not isinstance(health, dict):
        return type(health).__name__
    return f"{health['status']} (database {health['database']['status']})"


def _finish(result, env, load, restored, recovery_limit=None):
    """What every drill measures: calls, acknowledged registrations found
    afterwards exactly once, the longest stall and the recovery."""
    acknowledged = load.acknowledged_registrations()
    rows = env.postgres.query(
        "SELECT value, array_agg(DISTINCT patient_id::text)"
        " FROM patient_identifiers WHERE system IS NULL AND value LIKE %s"
        " GROUP BY value",
        load.prefix + "%",
    )
    stored = {value: ids for value, ids in rows}
    result.sent = len(load.calls)
    result.acknowledged = len(acknowledged)
    result.found = sum(
        stored.get(value) == [patient_id] for value, patient_id in acknowledged.items()
    )
    result.duplicates = sum(len(ids) - 1 for ids in stored.values())
    result.longest_stall = _round(load.longest_stall())
    result.measured["outcomes"] = _count(c.outcome for c in load.calls)
    durations = [c.took for c in load.calls if c.outcome == "ok"]
    if len(durations) > 1:
        result.measured["median ok call (ms)"] = round(
            statistics.median(durations) * 1000, 1
        )
    result.expect(result.found == result.acknowledged, "an acknowledged write is lost")
    result.expect(result.duplicates == 0, "a registration was stored twice")
    result.expect(
        not any(c.outcome in ("SearchMissed", "PatientNotFound") for c in load.calls),
        "an acknowledged patient could not be read or found",
    )
    result.expect(
        not any(c.outcome == "InternalError" for c in load.calls),
        "a caller got an InternalError",
    )
    if restored is not None:
        result.recovery = load.recovery(restored)
        result.recovery = result.recovery and _round(result.recovery)
        result.expect(
            result.recovery is not None and result.recovery <= recovery_limit,
            f"calls did not succeed again within {recovery_limit} s",
        )


def _count(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _round(seconds):
    return None if seconds is None else round(seconds, 2)


DRILLS = {
    "database-stopped": database_stopped,
    "database-stalled": database_stalled,
    "backends-paused": backends_paused,
    "broker-restarted": broker_restarted,
    "broker-crashed": broker_crashed,
    "service-killed": service_killed,
    "slow-searches": many_slow_searches,
    "malformed-flood": malformed_flood,
}
