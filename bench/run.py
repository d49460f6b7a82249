"""Measure the patient service as its callers load it, beside the floor
(``ping``) measured in the same run, and write ``docs/benchmarks.md``.

    .venv/bin/python bench/run.py

For each database size (seeded by ``bench/seed.py`` when missing) and each
number of service processes, the run starts the service (``nameko run``, on
this repository's config.yml) against that database and a RabbitMQ vhost of
its own, then times every call at 1 and at 10 concurrent callers, each caller
with its own ``ClusterRpcProxy`` in this separate process, and imports
``Patient.000.ndjson``. It reads the service processes' peak memory from
/proc, shows the query plans of the searches, removes what it wrote (the
audit trail stays, being append-only), and rewrites the part of the output
file between its markers, so the written analysis around it stays.
"""

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import psycopg2  # noqa: E402
import seed  # noqa: E402
from kombu import Connection  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402
from sqlalchemy.dialects.postgresql.psycopg2 import (  # noqa: E402
    dialect as psycopg2_dialect,
)

from patient import errors  # noqa: E402, F401 - registers the error types
from patient.db import prepared_forms  # noqa: E402
from patient.importer import run_import  # noqa: E402
from patient.index import name_tokens  # noqa: E402
from patient.search import search_query  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PATIENT_DATA", ROOT.parent / "shared" / "data"))
IMPORT_FILE = DATA / "fhir-bulk" / "Patient.000.ndjson"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# Measured once on the development machine with a raw AMQP client and
# server (no Nameko) plus a primary-key read in PostgreSQL.
PHYSICAL_FLOOR_MS = 0.8
SIZES = {"10k": 10_000, "1m": 1_000_000}
# What Workload.calls yields, in order.
CALLS = (
    "get_patient",
    "find_patient_by_identifier",
    "register_patient",
    "update_patient",
    "search name, one letter",
    "search name, common prefix",
    "search name, rare prefix",
    "search family + birthdate",
    "search phone",
    "search identifier",
)
CALL_TIMEOUT_S = 30
# PostgreSQL plans a prepared statement afresh for its first five runs,
# then may keep a generic plan: the plans shown are from after those.
PLAN_WARMUP_RUNS = 6


def main(argv=None):
    args = _parser().parse_args(argv)
    vhost = args.vhost
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    results = {"machine": _machine(), "started": _now(), "runs": [], "plans": {}}
    try:
        for label in args.sizes:
            db_uri = f"{args.db_base}/{args.db_prefix}_{label}"
            _ensure_seeded(db_uri, SIZES[label])
            results["plans"][label] = _plans(db_uri)
            for processes in args.processes:
                run = _measure(args, label, db_uri, vhost, processes)
                results["runs"].append(run)
    finally:
        rabbitmqctl("delete_vhost", vhost)
    results["finished"] = _now()
    results["load_end"] = os.getloadavg()
    results["versions"] = _versions(args)
    if args.raw:
        Path(args.raw).write_text(json.dumps(results, indent=1, default=str))
    write_markdown(Path(args.output), _markdown(results))
    print(f"wrote {args.output}")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--callers", nargs="+", type=int, default=[1, 10])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="timed per call and callers"
    )
    parser.add_argument(
        "--db-base",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server URL, without a database",
    )
    parser.add_argument(
        "--db-prefix",
        default="bench",
        help="databases are PREFIX_10k and PREFIX_1m, seeded when missing",
    )
    parser.add_argument(
        "--amqp-base",
        default="amqp://guest:guest@127.0.0.1:5672",
        help="RabbitMQ URL, without a vhost",
    )
    parser.add_argument(
        "--vhost",
        default="bench_patient_service",
        help="a vhost for the run alone: created, and DELETED at the end",
    )
    parser.add_argument(
        "--output",
        default=str(ROOT / "docs" / "benchmarks.md"),
        help="markdown file whose part between the bench markers is rewritten",
    )
    parser.add_argument("--raw", help="also write every figure as JSON here")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="parts each call is timed in, each after as long a part of ping",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*CALLS, "import"],
        metavar="CALL",
        help=f"time only these calls (and ping): {', '.join(CALLS)}, import",
    )
    return parser


# --- one configuration: a database size and a number of processes ---------


def _measure(args, label, db_uri, vhost, processes):
    amqp_uri = f"{args.amqp_base}/{vhost}"
    started = datetime.now(UTC)
    services = start_services(db_uri, amqp_uri, processes, vhost)
    config = {"AMQP_URI": amqp_uri}
    run = {"size": label, "processes": processes, "calls": [], "errors": {}}
    print(f"{label}, {processes} process(es), load {os.getloadavg()[0]:.2f}")
    try:
        work = Workload(db_uri)
        run["load_start"] = os.getloadavg()
        proxies = [ClusterRpcProxy(config, timeout=CALL_TIMEOUT_S) for _ in range(10)]
        callers = [proxy.start().patient_service for proxy in proxies]
        try:
            work.prepare_updates(callers)
            calls = dict(work.calls())
            for name, make in calls.items():
                if args.only and name not in args.only and name != "ping":
                    continue
                for count in args.callers:
                    figure = time_calls(
                        callers[:count],
                        make,
                        args.seconds,
                        rounds=args.rounds,
                        paired=calls["ping"] if name != "ping" else None,
                    )
                    figure.update(call=name, callers=count)
                    run["calls"].append(figure)
                    print(f"  {name:<28} {count:>2}: {summary(figure)}")
        finally:
            for proxy in proxies:
                proxy.stop()
        if not args.only or "import" in args.only:
            run["import"] = _import(config)
            print(f"  import: {run['import']['rate']:.0f} patients/s")
        run["load_end"] = os.getloadavg()
        run["memory"] = [_memory(s.pid) for s in services]
    finally:
        stop_services(services)
        _remove_written(db_uri, started)
    return run


def time_calls(callers, make, seconds, rounds=1, paired=None, keep=False):
    """Every caller calls in a loop for ``seconds`` (after half a second
    not counted); latencies in ms. In ``rounds`` parts, each after an equal
    part of ``paired``, when given: both then meet the same load, however
    the rest of the machine's load drifts during the run."""
    runs = {"call": ([], collections.Counter())}
    if paired is not None:
        runs["paired"] = ([], collections.Counter())
    for _ in range(rounds):
        if paired is not None:
            _loop(callers, paired, seconds / rounds, *runs["paired"])
        _loop(callers, make, seconds / rounds, *runs["call"])
    figure = figure_of(*runs["call"], seconds)
    if paired is not None:
        figure["paired"] = figure_of(*runs["paired"], seconds)
    if keep:
        figure["latencies"] = runs["call"][0]
    return figure


def _loop(callers, make, seconds, latencies, failures):
    warm_until = time.monotonic() + 0.5
    deadline = warm_until + seconds

    def caller(index, proxy):
        rng = random.Random(index)
        while (now := time.monotonic()) < deadline:
            method, call_args = make(rng, index)
            begun = time.perf_counter()
            try:
                method(proxy)(*call_args)
            except Exception as exc:
                failures[type(exc).__name__] += 1
                continue
            if now >= warm_until:
                latencies.append((time.perf_counter() - begun) * 1000)

    pool = eventlet.GreenPool(len(callers))
    for index, proxy in enumerate(callers):
        pool.spawn(caller, index, proxy)
    pool.waitall()


def figure_of(latencies, failures=(), seconds=1.0):
    latencies.sort()
    return {
        "rate": len(latencies) / seconds,
        "median": _percentile(latencies, 50),
        "p95": _percentile(latencies, 95),
        "p99": _percentile(latencies, 99),
        "calls": len(latencies),
        "failures": dict(failures),
    }


def _percentile(values, p):
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def summary(figure):
    failed = f", failures {figure['failures']}" if figure["failures"] else ""
    return (
        f"{figure['rate']:7.0f}/s median {figure['median']:.2f} ms"
        f" p95 {figure['p95']:.2f} p99 {figure['p99']:.2f}{failed}"
        + (f" (ping {figure['paired']['median']:.2f})" if "paired" in figure else "")
    )


def _import(config):
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as report:
        summary = run_import([IMPORT_FILE], config, report.name, timeout=60)
    patients = summary.records - summary.skipped
    return {
        "patients": patients,
        "created": summary.created,
        "seconds": summary.seconds,
        "rate": patients / summary.seconds,
    }


class Workload:
    """Arguments of each call, drawn from a sample of the stored patients."""

    def __init__(self, db_uri):
        self.run_id = uuid.uuid4().hex[:8]
        self.registered = 0
        with _connect(db_uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT reltuples FROM pg_class WHERE relname = 'patients'")
            total = max(cur.fetchone()[0], 1)
            cur.execute(
                "SELECT resource FROM patients TABLESAMPLE BERNOULLI (%s)"
                " REPEATABLE (1) LIMIT 3000",
                (min(100.0, 300_000 / total),),
            )
            self.sample = [row[0] for row in cur.fetchall()]
        self.ids = [r["id"] for r in self.sample]
        self.identifiers = [
            (i["system"], i["value"]) for r in self.sample for i in r["identifier"]
        ]
        self.phones = [
            # Found however it is written: the bench writes it another way.
            re.sub(r"[^\d+]+", " ", t["value"]).strip()
            for r in self.sample
            for t in r.get("telecom", ())
            if t["system"] == "phone"
        ]
        self.family_dates = [
            (r["name"][0]["family"], r["birthDate"])
            for r in self.sample
            if r.get("name") and r.get("birthDate")
        ]
        tokens = collections.Counter(
            token
            for r in self.sample
            for _, token in name_tokens(r)
            if " " not in token
        )
        heads = collections.Counter()
        for token, count in tokens.items():
            heads[token[:3]] += count
        self.letters = sorted({token[0] for token in tokens})
        self.common = [head for head, _ in heads.most_common(20)]
        self.rare = sorted(t[:5] for t, n in tokens.items() if n == 1 and len(t) > 4)
        self.versions = {}

    def prepare_updates(self, callers):
        """Each caller updates patients of its own, so none conflict."""
        self.mine = {}
        for index, proxy in enumerate(callers):
            ids = self.ids[index::10][:20]
            self.mine[index] = [proxy.get_patient(i) for i in ids]

    def calls(self):
        def search(criteria):
            return lambda rng, i: (_method("search_patients"), (criteria(rng),))

        yield "ping", lambda rng, i: (_method("ping"), ())
        yield (
            "get_patient",
            lambda rng, i: (
                _method("get_patient"),
                (rng.choice(self.ids),),
            ),
        )
        yield (
            "find_patient_by_identifier",
            lambda rng, i: (
                _method("find_patient_by_identifier"),
                rng.choice(self.identifiers),
            ),
        )
        yield "register_patient", self._register
        yield "update_patient", self._update
        yield (
            "search name, one letter",
            search(lambda rng: {"name": rng.choice(self.letters)}),
        )
        yield (
            "search name, common prefix",
            search(lambda rng: {"name": rng.choice(self.common)}),
        )
        yield (
            "search name, rare prefix",
            search(lambda rng: {"name": rng.choice(self.rare)}),
        )
        yield (
            "search family + birthdate",
            search(
                lambda rng: dict(
                    zip(
                        ("family", "birthdate"),
                        rng.choice(self.family_dates),
                        strict=True,
                    )
                )
            ),
        )
        yield "search phone", search(lambda rng: {"phone": rng.choice(self.phones)})
        yield (
            "search identifier",
            search(lambda rng: {"identifier": "|".join(rng.choice(self.identifiers))}),
        )

    def _register(self, rng, index):
        self.registered += 1
        resource, _ = seed._patient(rng, self.registered)
        del resource["id"], resource["meta"]
        for identifier in resource["identifier"]:
            identifier["value"] = f"bench-{self.run_id}-{self.registered}"
        return _method("register_patient"), (resource,)

    def _update(self, rng, index):
        patients = self.mine[index]
        position = rng.randrange(len(patients))
        current = patients[position]
        changed = {
            **current,
            "telecom": [{"system": "phone", "value": seed._phone(rng)}],
        }

        def update(proxy):
            def call(*args):
                patients[position] = proxy.update_patient(*args)

            return call

        return update, (current["id"], changed, current["meta"]["versionId"])


def _method(name):
    return lambda proxy: getattr(proxy, name)


# --- the service processes ------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_services(db_uri, amqp_uri, processes, vhost, **settings):
    env = {
        **os.environ,
        **settings,
        "DB_URI": db_uri,
        "AMQP_URI": amqp_uri,
        "LOG_LEVEL": "WARNING",
    }
    nameko = str(Path(sys.executable).with_name("nameko"))
    services = [
        subprocess.Popen(  # noqa: S603 - our own command line
            [nameko, "run", "--config", "config.yml", "patient.service"],
            cwd=ROOT,
            # Each process listens for HTTP on a port of its own: a second
            # one on the same port fails to start.
            env={**env, "WEB_SERVER_ADDRESS": f"127.0.0.1:{_free_port()}"},
            stdout=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    deadline = time.monotonic() + 60
    while _consumers(vhost) < processes:
        if time.monotonic() > deadline or any(s.poll() is not None for s in services):
            stop_services(services)
            sys.exit("the service did not start; see its output above")
        time.sleep(0.5)
    print(f"  service pids {' '.join(str(s.pid) for s in services)}", flush=True)
    return services


def _consumers(vhost):
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "consumers")
    for line in out.splitlines():
        name, _, count = line.partition("\t")
        if name == "rpc-patient_service":
            return int(count)
    return 0


def stop_services(services):
    for service in services:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
    for service in services:
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()


def _memory(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", status, re.MULTILINE))
    return {key: int(value) / 1024 for key, value in fields.items()}


def rabbitmqctl(*args):
    return subprocess.run(  # noqa: S603 - fixed command, our arguments
        ["rabbitmqctl", "-q", *args],  # noqa: S607 - on PATH with RabbitMQ
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


# --- the databases -------------------------------------------------------


def _connect(db_uri):
    return seed._connect(db_uri)


def _ensure_seeded(db_uri, size):
    try:
        with _connect(db_uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM patients")
            if cur.fetchone()[0] == size:
                return
    except psycopg2.Error:
        pass
    print(f"seeding {size:,} patients", file=sys.stderr)
    subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(ROOT / "bench" / "seed.py"), "--db-uri", db_uri]
        + ["--patients", str(size), "--replace"],
        check=True,
    )


def _remove_written(db_uri, since):
    """Take out what the run added, so the next run meets the same size."""
    with _connect(db_uri) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE written AS"
            " SELECT id FROM patients WHERE created_at >= %s",
            (since,),
        )
        for table in seed.TABLES[1:]:
            cur.execute(
                f"DELETE FROM {table} WHERE patient_id IN (TABLE written)"  # noqa: S608
            )
        cur.execute("DELETE FROM patients WHERE id IN (TABLE written)")
        cur.execute("DELETE FROM idempotency_records WHERE created_at >= %s", (since,))


def _plans(db_uri):
    """EXPLAIN ANALYZE of the statement each search runs, as the service
    builds and runs it: prepared, after enough runs that PostgreSQL may
    have settled on a generic plan, as on the service's connections."""
    work = Workload(db_uri)
    rng = random.Random(0)
    searches = {
        "name, one letter": {"name": work.letters[0]},
        "name, one letter (most common)": {
            "name": collections.Counter(h[0] for h in work.common).most_common(1)[0][0]
        },
        "name, common prefix": {"name": work.common[0]},
        "name, rare prefix": {"name": rng.choice(work.rare)},
        "family + birthdate": dict(
            zip(("family", "birthdate"), work.family_dates[0], strict=True)
        ),
        "phone": {"phone": work.phones[0]},
        "identifier": {"identifier": "|".join(work.identifiers[0])},
    }
    plans = {}
    dialect = psycopg2_dialect()
    with _connect(db_uri) as conn, conn.cursor() as cur:
        for number, (name, criteria) in enumerate(searches.items()):
            query, _, _ = search_query(criteria, region="US", encoded=True)
            compiled = query.compile(
                dialect=dialect, compile_kwargs={"render_postcompile": True}
            )
            parameters = {
                key: str(value) if isinstance(value, uuid.UUID) else value
                for key, value in compiled.params.items()
            }
            prepare, execute = prepared_forms(f"plan_{number}", str(compiled), ())
            cur.execute(prepare)
            for _ in range(PLAN_WARMUP_RUNS):
                cur.execute(execute, parameters)
            cur.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {execute}", parameters)
            plans[name] = {
                "criteria": criteria,
                "plan": "\n".join(row[0] for row in cur.fetchall()),
            }
    return plans


# --- the report ----------------------------------------------------------


def _machine():
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(total_kb / 1024 / 1024, 1),
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "os": platform.platform(),
        "load_start": os.getloadavg(),
    }


def _versions(args):
    with Connection(f"{args.amqp_base}/") as conn:
        conn.connect()
        rabbitmq = conn.connection.server_properties.get("version")
    with _connect(f"{args.db_base}/postgres") as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        postgres = cur.fetchone()[0]
    packages = ("nameko", "kombu", "amqp", "eventlet", "SQLAlchemy", "psycopg2-binary")
    return {
        "Python": platform.python_version(),
        "PostgreSQL": postgres,
        "RabbitMQ": rabbitmq,
        **{name: version(name) for name in packages},
    }


def _markdown(results):
    machine = results["machine"]
    lines = [
        START,
        f"Run of {results['started']} to {results['finished']} by `bench/run.py`.",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, {machine['os']}. Load average "
        f"{_load(machine['load_start'])} at the start, "
        f"{_load(results['load_end'])} at the end.",
        "",
        "Versions: "
        + ", ".join(f"{name} {v}" for name, v in results["versions"].items())
        + ".",
        "",
        "Rates are calls per second over the timed seconds; latencies in ms, "
        "seen by the caller. *× ping* is the rate as a share of `ping`'s rate "
        "at the same callers; *median × ping* the median over `ping`'s; "
        f"*× floor* the median over the {PHYSICAL_FLOOR_MS} ms a read through "
        "the bus costs at the least on this machine. Each call is timed in "
        "rounds, each after a round of `ping` as long; the ratios are to "
        "that `ping`, which met the same load (its median is in the *ping* "
        "column), and the `ping` rows are timed alone.",
    ]
    for run in results["runs"]:
        lines += _run_table(run)
    lines += ["", "### Query plans", ""]
    for label, plans in results["plans"].items():
        for name, found in plans.items():
            criteria = json.dumps(found["criteria"], ensure_ascii=False)
            lines += [
                f"**{label}, {name}** `{criteria}`",
                "",
                "```",
                found["plan"],
                "```",
                "",
            ]
    lines.append(END)
    return "\n".join(lines)


def _run_table(run):
    size = f"{SIZES[run['size']]:,}"
    memory = ", ".join(
        f"peak {m['VmHWM']:.0f} MB, now {m['VmRSS']:.0f} MB" for m in run["memory"]
    )
    lines = [
        "",
        f"### {size} patients, {run['processes']} service process"
        + ("es" if run["processes"] > 1 else ""),
        "",
        f"Load average {_load(run['load_start'])} before, "
        f"{_load(run['load_end'])} after. Service memory: {memory}.",
        "",
        "| call | callers | calls/s | × ping | median | p95 | p99 "
        "| ping | median × ping | p95 × ping median | × floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    pings = {f["callers"]: f for f in run["calls"] if f["call"] == "ping"}
    for figure in run["calls"]:
        ping = figure.get("paired") or pings[figure["callers"]]
        failed = (
            f" ({sum(figure['failures'].values())} failed)"
            if figure["failures"]
            else ""
        )
        lines.append(
            f"| {figure['call']}{failed} | {figure['callers']} "
            f"| {figure['rate']:,.0f} | {figure['rate'] / ping['rate']:.2f} "
            f"| {figure['median']:.2f} | {figure['p95']:.2f} | {figure['p99']:.2f} "
            f"| {ping['median']:.2f} | {figure['median'] / ping['median']:.2f} "
            f"| {figure['p95'] / ping['median']:.2f} "
            f"| {figure['median'] / PHYSICAL_FLOOR_MS:.1f} |"
        )
    if "import" in run:
        found = run["import"]
        register = next(
            (
                f
                for f in run["calls"]
                if f["call"] == "register_patient" and f["callers"] == 1
            ),
            None,
        )
        ratio = (
            f", {found['rate'] / register['rate']:.1f} × `register_patient` at 1 caller"
            if register
            else ""
        )
        lines += [
            "",
            f"Import of `Patient.000.ndjson` ({found['patients']:,} patients, "
            f"{found['created']:,} created): {found['seconds']:.1f} s, "
            f"**{found['rate']:,.0f} patients/s**{ratio}.",
        ]
    return lines


def _load(averages):
    return " / ".join(f"{value:.2f}" for value in averages)


def _now():
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_markdown(path, generated, start=START, end=END):
    """Put ``generated`` (which begins with ``start`` and ends with ``end``)
    in place of the file's part between those markers."""
    text = path.read_text("utf-8") if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + generated + rest.split(end, 1)[1]
    else:
        text = f"# Benchmarks\n\n{generated}\n{text}"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, "utf-8")


if __name__ == "__main__":
    main()
