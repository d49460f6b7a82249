# Steps shared by scripts/run, scripts/test, scripts/serve and .ci/run.
# Sourced, not run: it moves to the repository root and defines functions.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# The same defaults as config.yml and migrations/env.py.
: "${DB_URI:=postgresql://postgres@127.0.0.1:5432/patient_service}"
: "${AMQP_URI:=amqp://guest:guest@127.0.0.1:5672/}"
: "${WAIT_SECONDS:=60}"
export DB_URI AMQP_URI

# Debian keeps the servers' control commands in sbin, off a user's PATH.
case ":$PATH:" in
*:/usr/sbin:*) ;;
*) PATH="$PATH:/usr/sbin:/sbin" ;;
esac

ME="$(basename "$(dirname "$0")")/$(basename "$0")"

say() { printf '%s: %s\n' "$ME" "$*" >&2; }

die() {
    say "$*"
    exit 1
}

# Prints "host port" of URL $1; the port defaults to $2. Never the password.
url_endpoint() {
    local authority=${1#*://} host port
    authority=${authority%%[/?]*}
    authority=${authority##*@}
    if [[ $authority == \[* ]]; then
        host=${authority%%]*}
        host=${host#[}
        port=${authority##*]}
    else
        host=${authority%%:*}
        port=${authority#"$host"}
    fi
    port=${port#:}
    echo "${host:-127.0.0.1} ${port:-$2}"
}

answers() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

is_local() {
    [[ $1 == localhost || $1 == ::1 || $1 == 127.* ]]
}

# wait_for NAME HOST PORT: up to WAIT_SECONDS for a TCP answer.
wait_for() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    answers "$2" "$3" && return 0

    say "waiting for $1 on $2:$3"
    until answers "$2" "$3"; do
        ((SECONDS < deadline)) || die "$1 does not answer on $2:$3 after ${WAIT_SECONDS}s"
        sleep 1
    done
}

# ensure_venv REQUIREMENTS_FILE: .venv on Python 3.11 with that file
# installed. A stamp inside .venv skips pip while the requirements files are
# unchanged; a lock keeps two scripts from installing at once.
ensure_venv() {
    (
        flock 9
        install_venv "$1"
    ) 9<"$ROOT/scripts/lib.sh"
}

install_venv() {
    local requirements=$1 stamp=".venv/.installed-${1%.txt}" wanted
    if [[ ! -x .venv/bin/python ]]; then
        command -v python3.11 >/dev/null ||
            die "python3.11 is not on PATH; install Python 3.11" \
                "(Debian 12: apt-get install -y python3.11 python3.11-venv)"
        say "creating .venv with python3.11"
        python3.11 -m venv .venv || {
            rm -rf .venv
            die "python3.11 could not create .venv" \
                "(Debian 12: apt-get install -y python3.11-venv)"
        }
    fi
    .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        die ".venv is not Python 3.11; remove it and run this again"

    wanted=$(sha256sum requirements*.txt pyproject.toml)
    installed "$stamp" "$wanted" && return 0
    # The development set includes the runtime set.
    [[ $requirements == requirements.txt ]] &&
        grep -qx -- '-r requirements.txt' requirements-dev.txt &&
        installed .venv/.installed-requirements-dev "$wanted" && return 0

    say "installing $requirements into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$requirements" || die "pip could not install $requirements"
    # The project itself, editable: `import patient` and `patient-import`
    # work from any folder, in nameko shell too.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        --no-input --no-deps --no-build-isolation --editable . ||
        die "pip could not install the project into .venv"
    printf '%s\n' "$wanted" >"$stamp"
}

# installed STAMP HASH: STAMP holds HASH, that of the requirements files
# and pyproject.toml.
installed() {
    [[ -f $1 && "$(<"$1")" == "$2" ]]
}

# ensure_postgres URI: PostgreSQL answers at URI's host and port, started
# here if it is a local cluster that is down.
ensure_postgres() {
    local host port cluster
    read -r host port < <(url_endpoint "$1" 5432)
    answers "$host" "$port" && return 0

    if is_local "$host"; then
        command -v pg_ctlcluster >/dev/null ||
            die "PostgreSQL does not answer on $host:$port and is not installed;" \
                "install it (apt-get install -y postgresql) or set DB_URI"
        cluster=$(pg_lsclusters -h | awk -v port="$port" '$3 == port { print $1, $2; exit }')
        [[ -n $cluster ]] ||
            die "no PostgreSQL cluster is set up for port $port (see pg_lsclusters)"
        say "starting PostgreSQL cluster $cluster"
        # shellcheck disable=SC2086 # "version name", two arguments
        pg_ctlcluster --skip-systemctl-redirect $cluster start ||
            die "could not start PostgreSQL cluster $cluster"
    fi
    wait_for PostgreSQL "$host" "$port"
}

# ensure_rabbitmq URI: the same for RabbitMQ.
ensure_rabbitmq() {
    local host port
    read -r host port < <(url_endpoint "$1" 5672)
    answers "$host" "$port" && return 0

    if is_local "$host"; then
        command -v rabbitmq-server >/dev/null ||
            die "RabbitMQ does not answer on $host:$port and is not installed;" \
                "install it (apt-get install -y rabbitmq-server) or set AMQP_URI"
        say "starting RabbitMQ"
        rabbitmq-server -detached || die "could not start RabbitMQ"
    fi
    wait_for RabbitMQ "$host" "$port"
}

# ensure_vhost URI: on a local RabbitMQ, creates the URI's vhost if it is
# missing, with every permission for the URI's user (a development machine's
# broker). Elsewhere check_broker below says what is wrong.
ensure_vhost() {
    local host port vhost user
    read -r host port < <(url_endpoint "$1" 5672)
    is_local "$host" && command -v rabbitmqctl >/dev/null || return 0
    read -r vhost user < <(.venv/bin/python -c '
import sys
from kombu.utils.url import url_to_parts
parts = url_to_parts(sys.argv[1])
print(parts.path or "/", parts.username or "guest")' "$1")
    # -s: no header line, which would read as a vhost called "name".
    rabbitmqctl -s list_vhosts name 2>/dev/null | grep -qxF -- "$vhost" && return 0
    say "creating the RabbitMQ vhost $vhost for $user"
    { rabbitmqctl -q add_vhost "$vhost" &&
        rabbitmqctl -q set_permissions -p "$vhost" "$user" '.*' '.*' '.*'; } ||
        die "could not create the RabbitMQ vhost $vhost (rabbitmqctl add_vhost)"
}

# check_broker: logs in to AMQP_URI once. A missing vhost or a refused
# login would otherwise have the service retry, and log, without end.
check_broker() {
    python - "$AMQP_URI" <<'EOF' ||
import sys

from kombu import Connection

try:
    with Connection(sys.argv[1], connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
EOF
        die "could not log in with AMQP_URI (reason above): create its vhost and user, or fix the URI"
}

# Creates the database named in DB_URI unless it exists. Tries the database
# itself first, so that a user without rights on "postgres" can still start.
create_database() {
    python - "$DB_URI" <<'EOF' || die "could not create the database named in DB_URI"
import sys

import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1])
params = {
    "host": url.host,
    "port": url.port,
    "user": url.username,
    "password": url.password,
    "connect_timeout": 5,
    **url.query,
}
params = {key: value for key, value in params.items() if value is not None}
try:
    psycopg2.connect(dbname=url.database, **params).close()
except psycopg2.OperationalError:
    conn = psycopg2.connect(dbname="postgres", **params)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
        if cur.fetchone():
            raise
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    conn.close()
    print(f"created database {url.database}", file=sys.stderr)
EOF
}
