"""What each of Nameko's RPC publish options costs a call, on this machine.

    .venv/bin/python bench/publish_options.py

Times ``ping`` and ``get_patient`` at one caller under every combination of
the service's reply options (``RPC_REPLY_CONFIRMS``, ``RPC_REPLY_PERSISTENT``)
and the caller's request options (publisher confirms, delivery mode), with
the 10,000-patient database of ``bench/run.py``, and writes the table into
``docs/benchmarks.md`` between its own markers.
"""

import run  # noqa: I001 - first: it monkey-patches for eventlet

import argparse
import random
import warnings
from pathlib import Path

from nameko.rpc import ServiceProxy
from nameko.standalone.rpc import ClusterRpcProxy

START, END = "<!-- options:start -->", "<!-- options:end -->"
# Without confirms Nameko cannot tell an unknown service (UnknownService):
# the price of the faster rows, said in docs/benchmarks.md.
warnings.filterwarnings("ignore", message="Mandatory delivery was requested")
REPLIES = ((True, True), (True, False), (False, True), (False, False))
REQUESTS = ((True, 2), (True, 1), (False, 2), (False, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db-uri", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="bench_10k")
    parser.add_argument("--amqp-base", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--vhost", default="bench_patient_options")
    parser.add_argument("--output", default=str(run.ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)

    db_uri = f"{args.db_uri}/{args.db_name}"
    run._ensure_seeded(db_uri, run.SIZES["10k"])
    ids = run.Workload(db_uri).ids
    # One service for each reply setting, each in a vhost of its own, all
    # up at once: every combination is timed in each round, so all of them
    # meet the same load however it drifts.
    vhosts = [f"{args.vhost}_{n}" for n in range(len(REPLIES))]
    services, proxies = [], {}
    try:
        for vhost, (confirms, persistent) in zip(vhosts, REPLIES, strict=True):
            run.rabbitmqctl("add_vhost", vhost)
            run.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            amqp_uri = f"{args.amqp_base}/{vhost}"
            services += run.start_services(
                db_uri,
                amqp_uri,
                1,
                vhost,
                RPC_REPLY_CONFIRMS=str(confirms).lower(),
                RPC_REPLY_PERSISTENT=str(persistent).lower(),
            )
            for request in REQUESTS:
                proxies[(confirms, persistent), request] = _proxy(amqp_uri, request)
        figures = _measure(proxies, ids, args.seconds, args.rounds)
    finally:
        for proxy, _ in proxies.values():
            proxy.stop()
        run.stop_services(services)
        for vhost in vhosts:
            run.rabbitmqctl("delete_vhost", vhost)
    rows = [(reply, request, figures[reply, request]) for reply, request in proxies]
    for row in rows:
        print(row[0], row[1], {k: round(v["median"], 2) for k, v in row[2].items()})
    run.write_markdown(Path(args.output), _markdown(rows), START, END)
    print(f"wrote {args.output}")


def _proxy(amqp_uri, request):
    confirms, delivery_mode = request
    proxy = ClusterRpcProxy({"AMQP_URI": amqp_uri}, timeout=run.CALL_TIMEOUT_S)
    cluster = proxy.start()
    # The standalone proxy takes no publish options; a service proxy on its
    # reply queue does.
    service = ServiceProxy(
        cluster._worker_ctx,
        "patient_service",
        cluster._reply_listener,
        use_confirms=confirms,
        delivery_mode=delivery_mode,
    )
    return proxy, service


def _measure(proxies, ids, seconds, rounds):
    calls = {
        "ping": lambda rng, i: (lambda s: s.ping, ()),
        "get_patient": lambda rng, i: (lambda s: s.get_patient, (rng.choice(ids),)),
    }
    latencies = {key: {call: [] for call in calls} for key in proxies}
    for _ in range(rounds):
        for key, (_, service) in proxies.items():
            for call, make in calls.items():
                figure = run.time_calls([service], make, seconds, keep=True)
                latencies[key][call] += figure["latencies"]
    return {
        key: {
            call: run.figure_of(found, seconds=seconds * rounds)
            for call, found in by.items()
        }
        for key, by in latencies.items()
    }


def _markdown(rows):
    default = next(
        f for reply, req, f in rows if reply == (True, True) and req == (True, 2)
    )
    lines = [
        START,
        "| reply confirms | reply persistent | request confirms "
        "| request persistent | `ping` median | `ping` calls/s "
        "| `get_patient` median | vs Nameko's defaults |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    for (r_confirms, r_persistent), (q_confirms, mode), figures in rows:
        ping, read = figures["ping"], figures["get_patient"]
        saved = default["ping"]["median"] - ping["median"]
        lines.append(
            f"| {_yes(r_confirms)} | {_yes(r_persistent)} | {_yes(q_confirms)} "
            f"| {_yes(mode == 2)} | {ping['median']:.2f} ms | {ping['rate']:,.0f} "
            f"| {read['median']:.2f} ms | {saved and -saved:+.2f} ms |"
        )
    lines += [
        "",
        "What each option costs `ping`, on average over the other options:",
        "",
    ]
    options = (
        ("reply confirms", lambda reply, req: reply[0]),
        ("reply persistent", lambda reply, req: reply[1]),
        ("request confirms", lambda reply, req: req[0]),
        ("request persistent", lambda reply, req: req[1] == 2),
    )
    for name, chosen in options:
        on = [f["ping"]["median"] for reply, req, f in rows if chosen(reply, req)]
        off = [f["ping"]["median"] for reply, req, f in rows if not chosen(reply, req)]
        cost = sum(on) / len(on) - sum(off) / len(off)
        lines.append(f"- {name}: {cost:+.2f} ms")
    lines.append(END)
    return "\n".join(lines)


def _yes(value):
    return "yes" if value else "no"


if __name__ == "__main__":
    random.seed(0)
    main()
