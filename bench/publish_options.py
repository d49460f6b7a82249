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
from pathlib import Path

from nameko.rpc import ServiceProxy
from nameko.standalone.rpc import ClusterRpcProxy

START, END = "<!-- options:start -->", "<!-- options:end -->"
REPLIES = ((True, True), (True, False), (False, True), (False, False))
REQUESTS = ((True, 2), (True, 1), (False, 2), (False, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--db-uri", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="bench_10k")
    parser.add_argument("--amqp-base", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--vhost", default="bench_patient_options")
    parser.add_argument("--output", default=str(run.ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)

    db_uri = f"{args.db_uri}/{args.db_name}"
    run._ensure_seeded(db_uri, run.SIZES["10k"])
    ids = run.Workload(db_uri).ids
    run.rabbitmqctl("add_vhost", args.vhost)
    run.rabbitmqctl("set_permissions", "-p", args.vhost, "guest", ".*", ".*", ".*")
    amqp_uri = f"{args.amqp_base}/{args.vhost}"
    rows = []
    try:
        for confirms, persistent in REPLIES:
            services = run.start_services(
                db_uri,
                amqp_uri,
                1,
                args.vhost,
                RPC_REPLY_CONFIRMS=str(confirms).lower(),
                RPC_REPLY_PERSISTENT=str(persistent).lower(),
            )
            try:
                for request in REQUESTS:
                    figures = _measure(amqp_uri, request, ids, args.seconds)
                    rows.append(((confirms, persistent), request, figures))
                    print((confirms, persistent), request, figures)
            finally:
                run.stop_services(services)
    finally:
        run.rabbitmqctl("delete_vhost", args.vhost)
    run.write_markdown(Path(args.output), _markdown(rows), START, END)
    print(f"wrote {args.output}")


def _measure(amqp_uri, request, ids, seconds):
    confirms, delivery_mode = request
    proxy = ClusterRpcProxy({"AMQP_URI": amqp_uri}, timeout=run.CALL_TIMEOUT_S)
    cluster = proxy.start()
    try:
        # The standalone proxy takes no publish options; a service proxy
        # on its reply queue does.
        service = ServiceProxy(
            cluster._worker_ctx,
            "patient_service",
            cluster._reply_listener,
            use_confirms=confirms,
            delivery_mode=delivery_mode,
        )
        ping = run.time_calls([service], lambda rng, i: (lambda s: s.ping, ()), seconds)
        read = run.time_calls(
            [service],
            lambda rng, i: (lambda s: s.get_patient, (rng.choice(ids),)),
            seconds,
        )
    finally:
        proxy.stop()
    return {"ping": ping, "get_patient": read}


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
            f"| {read['median']:.2f} ms | {-saved:+.2f} ms |"
        )
    lines.append(END)
    return "\n".join(lines)


def _yes(value):
    return "yes" if value else "no"


if __name__ == "__main__":
    random.seed(0)
    main()
