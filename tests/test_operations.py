"""Health, migrations and unexpected failures."""

import logging
import re

import pytest
import yaml
from nameko.cli.main import setup_yaml_parser
from nameko.testing.services import entrypoint_hook
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from patient import health
from patient.dependencies import CallerProvider, rpc
from patient.errors import InternalError
from patient.models import Base
from tests.conftest import ROOT, migrate
from tests.factories import patient

# config.get("SETTING" or config["SETTING"], as the service reads them.
SETTING = re.compile(r'config(?:\.get\(|\[)"([A-Za-z_]+)"')


def test_health_reports_database_and_broker_up(patients):
    report = patients.health()

    assert report["status"] == "ok"
    assert report["database"]["status"] == "up"
    assert report["broker"]["status"] == "up"


def test_health_reports_an_unreachable_broker_as_down():
    report = health.broker_status("amqp://guest:guest@127.0.0.1:1/", timeout=1)
    assert report["status"] == "down"


def test_health_reports_an_unreachable_database_as_down():
    engine = create_engine(
        "postgresql+psycopg2://postgres@127.0.0.1:1/x",
        connect_args={"connect_timeout": 1},
    )
    with Session(engine) as session:
        assert health.database_status(session)["status"] == "down"
    assert health.overall(
        {"database": {"status": "down"}, "broker": {"status": "up"}}
    ) == ("down")


def test_migrations_go_down_and_up_again(db_uri, engine, clean_db):
    migrate(db_uri, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    migrate(db_uri, "head")
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())


def test_migrations_match_the_models(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_the_audit_trail_cannot_be_rewritten(patients, engine):
    patients.register_patient(patient())

    with engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text("UPDATE audit_events SET actor = 'someone else'"))
    with engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text("DELETE FROM audit_events"))


class Failing:
    name = "failing"
    caller = CallerProvider()

    secret = "Jane Doe, born 1931-07-29"

    @rpc
    def explode(self):
        raise RuntimeError(self.secret)


def test_unexpected_errors_reach_the_caller_as_internal_error_with_a_reference(
    container_factory, caplog
):
    container = container_factory(Failing, {"AMQP_URI": "memory://"})
    container.start()

    with (
        entrypoint_hook(container, "explode") as explode,
        pytest.raises(InternalError) as raised,
    ):
        explode()

    reference = raised.value.reference
    logged = "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    )
    assert reference in logged
    assert "RuntimeError" in logged
    assert "Jane" not in logged and "1931" not in logged


def test_ping_touches_nothing_and_answers(patients):
    assert patients.ping() == "pong"


def test_every_setting_the_code_reads_is_in_config_yml():
    setup_yaml_parser()
    shipped = yaml.safe_load((ROOT / "config.yml").read_text())
    read = set()
    for package in ("patient", "queue_standin"):
        for module in (ROOT / package).glob("*.py"):
            read |= set(SETTING.findall(module.read_text()))

    assert read, "no settings found: the pattern is stale"
    assert read - set(shipped) == set()
