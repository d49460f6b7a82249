"""The hot reads: prepared statements, reads past the session, and
resources passed through into answers without decoding."""

import json
import uuid
from datetime import UTC, datetime

import pytest
from kombu.utils.json import dumps as kombu_dumps
from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from patient import records, search
from patient.caller import Caller
from patient.db import (
    RECYCLE_S,
    PatientDatabase,
    engine_options,
    insert_all,
    make_engine,
    prepared,
    read_first,
)
from patient.encoded import EncodedJson, decode_all, embed
from patient.models import Base, Patient, PatientIdentifier
from tests.factories import patient


@pytest.fixture
def small_engine(db_uri, clean_db):
    """One pooled connection, so every read meets the same one."""
    engine = make_engine(db_uri, {"MAX_WORKERS": -1})
    yield engine
    engine.dispose()


def prepared_names(engine):
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT name FROM pg_prepared_statements")
        return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def test_a_read_is_prepared_once_per_connection_and_again_on_a_new_one(
    small_engine, db
):
    first = records.register_patient(db, patient(), records_caller())

    with Session(small_engine) as session:
        assert records.get_patient(session, first["id"]) == first
        assert records.get_patient(session, first["id"]) == first
    assert "get_patient" in prepared_names(small_engine)

    # PostgreSQL ends the connection: the read that finds it fails as a
    # lost connection, and the next one prepares on a new connection.
    with Session(small_engine) as session:
        (pid,) = read_first(session, "pid", "SELECT pg_backend_pid()", {})
    db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with Session(small_engine) as session:
        with pytest.raises(OperationalError) as lost:
            records.get_patient(session, first["id"])
        assert lost.value.connection_invalidated
        assert records.get_patient(session, first["id"]) == first
    assert small_engine.pool.checkedin() == 1


def test_a_failed_read_drops_its_connection_and_raises_sqlalchemys_error(
    small_engine,
):
    with Session(small_engine) as session:
        with pytest.raises(DBAPIError) as raised:
            read_first(session, "broken", "SELECT 1 / %(zero)s", {"zero": 0})
        assert raised.value.orig.pgcode == "22012"
        # Parameters stay out of the error's text: they may be patient data.
        assert "parameters hidden" in str(raised.value)

        # The next read gets a fresh connection, which prepares afresh.
        assert read_first(session, "one", "SELECT %(x)s::int", {"x": 1}) == (1,)


def test_an_unreachable_database_is_an_operational_error(db_uri):
    engine = make_engine(
        "postgresql://postgres@127.0.0.1:1/none", {"DB_CONNECT_TIMEOUT_S": 1}
    )
    with Session(engine) as session, pytest.raises(OperationalError):
        read_first(session, "get_patient", "SELECT 1", {})


def test_a_prepared_statement_keeps_percent_signs_and_repeated_parameters(
    small_engine, db
):
    records.register_patient(db, patient(gender="female"), records_caller())
    gender = bindparam("gender")
    query = select(text("'100%' AS literal"), Patient.gender).where(
        Patient.gender.like(gender) | (Patient.gender == gender)
    )

    with Session(small_engine) as session:
        conn = session.connection()
        found = conn.execute(prepared(query), {"gender": "fem%"}).all()
        missed = conn.execute(prepared(query), {"gender": "male"}).all()

    assert found == [("100%", "female")]
    assert missed == []


def records_caller():
    return Caller(actor="test")


def test_search_answers_embed_resources_exactly_as_stored(db):
    stored = [
        records.register_patient(
            db,
            patient(name=[{"family": f"Ödön-{n}", "given": ['Zoë "Q" \\ 😀']}]),
            records_caller(),
        )
        for n in range(3)
    ]
    stored.sort(key=lambda resource: resource["id"])  # pages go in id order

    page = search.search_patients(db, {"family": "Ödön"}, 2, encoded=True)

    assert all(isinstance(p, EncodedJson) for p in page["patients"])
    answer = json.loads(embed({"result": page, "error": None}, kombu_dumps))
    assert answer["result"]["patients"] == stored[:2]
    assert answer["result"]["next_cursor"] == page["next_cursor"]
    assert decode_all(page)["patients"] == stored[:2]


def test_embedding_leaves_text_that_looks_like_a_placeholder_alone():
    sneaky = {"text": "\x00abc:0\x00", "given": ["\\u0000"]}
    value = {"patients": [EncodedJson('{"a": 1}')], "note": sneaky}

    decoded = json.loads(embed(value, json.dumps))

    assert decoded == {"patients": [{"a": 1}], "note": sneaky}
    assert json.loads(embed({"plain": [1, "x"]}, json.dumps)) == {"plain": [1, "x"]}


def test_insert_all_writes_every_table_in_one_statement_or_nothing(small_engine):
    def writes(patient_id, value):
        now = datetime.now(UTC)
        resource = {"resourceType": "Patient", "name": [{"family": "Ñúñez 😀"}]}
        return [
            (
                Patient,
                [
                    {
                        "id": patient_id,
                        "version": 1,
                        "resource": resource,
                        "active": True,
                        "gender": None,
                        "birth_date_start": None,
                        "birth_date_end": None,
                        "last_updated": now,
                        "created_at": now,
                    }
                ],
            ),
            (
                PatientIdentifier,
                [
                    {"patient_id": patient_id, "system": "urn:t", "value": value},
                    {"patient_id": patient_id, "system": None, "value": "kept"},
                ],
            ),
        ]

    first, second = uuid.uuid4(), uuid.uuid4()
    with Session(small_engine) as session:
        insert_all(session, writes(first, "A-1"))
        session.commit()
        with pytest.raises(IntegrityError):
            insert_all(session, writes(second, "A-1"))
        session.rollback()

        stored = session.execute(text("SELECT id, resource::text FROM patients")).all()
        identifiers = session.execute(
            text("SELECT system, value FROM patient_identifiers ORDER BY value")
        ).all()
    assert stored == [(first, json.dumps(writes(first, "")[0][1][0]["resource"]))]
    assert identifiers == [("urn:t", "A-1"), (None, "kept")]


def test_a_connection_keeps_a_bounded_number_of_prepared_statements(
    small_engine, monkeypatch
):
    monkeypatch.setattr("patient.db.MAX_PREPARED", 3)

    with Session(small_engine) as session:
        answers = [
            read_first(session, f"shape_{n}", f"SELECT %(n)s::int + {n}", {"n": 1})
            for n in range(7)
        ]

    assert answers == [(1 + n,) for n in range(7)]
    assert 1 <= len(prepared_names(small_engine)) <= 3


def test_a_lost_connection_replaces_every_older_one(db_uri, clean_db, db):
    engine = make_engine(db_uri, {"MAX_WORKERS": 1})  # a pool of three
    try:
        first = records.register_patient(db, patient(), records_caller())
        held = [engine.raw_connection() for _ in range(3)]
        pids = []
        for connection in held:
            cursor = connection.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
            connection.close()
        # This engine's connections only: the running service shares the
        # database.
        db.execute(
            text("SELECT pg_terminate_backend(pid) FROM unnest(:pids) AS pid"),
            {"pids": pids},
        )

        with Session(engine) as session:
            with pytest.raises(OperationalError):
                records.get_patient(session, first["id"])
            # Three at once: none is one of the dead ones.
            connections = [engine.raw_connection() for _ in range(3)]
            for connection in connections:
                connection.cursor().execute("SELECT 1")
                connection.close()
            assert records.get_patient(session, first["id"]) == first
    finally:
        engine.dispose()


@pytest.fixture
def resource_as_jsonb(engine):
    """The patients' resource column changed under a running service, as a
    migration would, and changed back."""

    def alter(table, column, kind):
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {kind}"))

    yield alter
    alter("patients", "resource", "json")
    alter("idempotency_records", "response", "json")


def test_a_migration_changing_a_read_column_costs_one_retryable_failure(
    small_engine, db, resource_as_jsonb
):
    first = records.register_patient(db, patient(), records_caller())
    with Session(small_engine) as session:
        assert records.get_patient(session, first["id"]) == first

    resource_as_jsonb("patients", "resource", "jsonb")

    with Session(small_engine) as session:
        with pytest.raises(DBAPIError) as stale:
            records.get_patient(session, first["id"])
        assert stale.value.connection_invalidated
        assert records.get_patient(session, first["id"]) == first


def test_a_migration_changing_the_kept_answers_costs_one_retryable_failure(
    small_engine, resource_as_jsonb
):
    resource = patient()
    with Session(small_engine) as session:
        first = records.register_patient(session, resource, records_caller(), "k-1")

    resource_as_jsonb("idempotency_records", "response", "jsonb")

    with Session(small_engine) as session:
        with pytest.raises(DBAPIError) as stale:
            records.register_patient(session, resource, records_caller(), "k-1")
        assert stale.value.connection_invalidated
        session.rollback()
        again = records.register_patient(session, resource, records_caller(), "k-1")
    assert again == first


def test_no_idle_timeout_keeps_connections_for_the_usual_age():
    assert engine_options({"DB_IDLE_TIMEOUT_S": 0})["pool_recycle"] == RECYCLE_S
    assert engine_options({"DB_IDLE_TIMEOUT_S": 60})["pool_recycle"] == 30


def test_the_database_extension_may_be_stopped_and_killed(db_uri):
    extension = PatientDatabase(Base)
    extension.engine = make_engine(db_uri)

    extension.stop()
    extension.kill()

    assert "engine" not in extension.__dict__
