"""scripts/drills [--keep] [DRILL...]: run the drills (all by default) on
private servers, print what each measured, and record the results in
docs/resilience.md. Exits non-zero if a drill found a fault."""

import warnings

# Known and accepted: the service runs on Nameko, which runs on eventlet.
warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

from drills import report  # noqa: E402
from drills.scenarios import DRILLS, environment  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m drills", description=__doc__)
    parser.add_argument("drills", nargs="*", metavar="DRILL", help=", ".join(DRILLS))
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' folder and logs"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="leave docs/resilience.md alone"
    )
    args = parser.parse_args(argv)
    unknown = set(args.drills) - set(DRILLS)
    if unknown:
        parser.error(f"no such drill: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Proxies closed while the broker still sends confirms say so; noise here.
    logging.getLogger("amqp").setLevel(logging.ERROR)

    results = []
    with environment(keep=args.keep) as env:
        if args.keep:
            print(f"servers and logs in {env.workdir}", file=sys.stderr)
        for name in args.drills or list(DRILLS):
            print(f"drill {name} ...", file=sys.stderr, flush=True)
            result = DRILLS[name](env)
            results.append(result)
            print(report.render([asdict(result)]), flush=True)
            if not args.no_record:
                report.record([result])
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
