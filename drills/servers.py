"""Private servers for the drills: a PostgreSQL cluster, a RabbitMQ node and
the service itself as a process, on 127.0.0.1 and free ports, in a folder of
their own. Nothing here touches a server it did not start."""

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import eventlet
import psycopg2
from nameko.standalone.rpc import ClusterRpcProxy

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Debian's rabbitmq-server in sbin sends a node's output to the shared
# /var/log/rabbitmq/startup_log; the script it wraps leaves that alone.
RABBITMQ_SERVER = next(
    (p for p in ("/usr/lib/rabbitmq/bin/rabbitmq-server",) if Path(p).exists()),
    "rabbitmq-server",
)


class DrillError(Exception):
    """A server the drill needs would not start or stop."""


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def as_user(user):
    """Run a server as its own account when root: initdb refuses root, and
    RabbitMQ's files should belong to rabbitmq."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def run(command, *, env=None, timeout=120):
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise DrillError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return done.stdout


def owned_dir(path, user):
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(path, user, user)
    return path


def pg_bin():
    found = os.environ.get("PG_BIN") or max(
        glob.glob("/usr/lib/postgresql/*/bin"), default=None
    )
    if not found:
        raise DrillError("no PostgreSQL server binaries; set PG_BIN")
    return Path(found)


class Postgres:
    """A PostgreSQL cluster of the drill's own: trust authentication, on
    127.0.0.1 only, with its socket in its own folder."""

    def __init__(self, workdir):
        self.dir = owned_dir(workdir / "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.bin = pg_bin()
        self.running = False

    def _ctl(self, *args, timeout=60):
        command = [*as_user("postgres"), str(self.bin / "pg_ctl"), "-D", str(self.data)]
        return run([*command, *args], timeout=timeout)

    def init(self):
        run(
            [
                *as_user("postgres"),
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ]
        )
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": self.port,
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": 120,
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def start(self):
        self._ctl("-l", str(self.log), "-w", "-t", "60", "start")
        self.running = True

    def stop(self):
        self._ctl("-m", "fast", "-w", "stop")
        self.running = False

    def uri(self, database="patient_service", port=None):
        return f"postgresql://postgres@{HOST}:{port or self.port}/{database}"

    def connect(self, database="patient_service"):
        return psycopg2.connect(
            host=HOST,
            port=self.port,
            user="postgres",
            dbname=database,
            connect_timeout=5,
        )

    def create_database(self, name="patient_service"):
        conn = self.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def query(self, sql, *params):
        conn = self.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def service_connections(self):
        return self.query(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'patient_service'"
        )[0][0]

    def destroy(self):
        if self.running:
            with contextlib.suppress(DrillError, subprocess.TimeoutExpired):
                self.stop()


class Rabbit:
    """A RabbitMQ node of the drill's own, its data kept across restarts."""

    def __init__(self, workdir):
        self.dir = owned_dir(workdir / "rabbitmq", "rabbitmq")
        self.port = free_port()
        self.node = f"drill{os.getpid()}@localhost"
        self.process = None
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(f"listeners.tcp.local = {HOST}:{self.port}\n")
        env_file = self.dir / "rabbitmq-env.conf"
        # Our own env file: the machine's may name another node.
        env_file.write_text(
            f"NODENAME={self.node}\nERL_EPMD_ADDRESS={HOST}\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        plugins = self.dir / "enabled_plugins"
        plugins.write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": os.path.expanduser("~rabbitmq"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
        }
        if os.geteuid() == 0:
            for path in self.dir.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")

    @property
    def uri(self):
        return self.uri_at(None)

    def uri_at(self, port):
        return f"amqp://guest:guest@{HOST}:{port or self.port}/"

    def _ctl(self, *args, timeout=120):
        command = [*as_user("rabbitmq"), "rabbitmqctl", "-q", "-n", self.node]
        return run([*command, *args], env=self.env, timeout=timeout)

    def start(self):
        log = open(self.dir / "server.out", "ab")  # noqa: SIM115 - the server's
        self.process = subprocess.Popen(
            [*as_user("rabbitmq"), RABBITMQ_SERVER],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        # await_startup gives up at once on a node not yet known to epmd.
        deadline = time.monotonic() + 90
        while True:
            try:
                self._ctl("await_startup", "--timeout", "30")
                return
            except DrillError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                eventlet.sleep(0.5)

    def stop(self):
        try:
            self._ctl("stop")
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None

    def kill(self):
        """SIGKILL the Erlang VM, as a crash would; the data stays."""
        vm = int(Path(self.env["RABBITMQ_PID_FILE"]).read_text())
        os.kill(vm, signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def destroy(self):
        if self.process is not None:
            with contextlib.suppress(DrillError, subprocess.TimeoutExpired):
                self.stop()


class Service:
    """``nameko run`` of the service, as a process that can be killed."""

    def __init__(self, workdir, amqp_uri, db_uri, **settings):
        self.log = workdir / "service.log"
        self.amqp_uri = amqp_uri
        self.env = {
            **os.environ,
            "AMQP_URI": amqp_uri,
            "DB_URI": db_uri,
            **{key: str(value) for key, value in settings.items()},
        }
        self.process = None

    def start(self, timeout=60):
        nameko = Path(sys.executable).parent / "nameko"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(nameko), "run", "--config", "config.yml", "patient.service"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DrillError(f"the service exited with {self.process.returncode}")
            with (
                contextlib.suppress(Exception),
                eventlet.Timeout(5),
                ClusterRpcProxy({"AMQP_URI": self.amqp_uri}, timeout=2) as rpc,
            ):
                if rpc.patient_service.ping() == "pong":
                    return
            eventlet.sleep(0.2)
        raise DrillError("the service did not answer ping in time")

    @property
    def alive(self):
        return self.process is not None and self.process.poll() is None

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)
        self.process.wait(30)

    def stop(self):
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
