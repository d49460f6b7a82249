"""Fill a benchmark database with realistic patients, fast and reproducibly.

    python bench/seed.py --db-uri postgresql://.../bench_1m --patients 1000000

Creates the database if it is missing, migrates it to head, and refuses one
that already holds patients unless ``--replace`` empties it first. The same
``--seed`` gives the same patients. Names mix the family and given names of
the team's Synthea and FHIR example files (``names.json``) with names made of
syllables in Latin with accents, Greek, Cyrillic, Chinese, Japanese and
Arabic; every patient has two identifiers, a phone number (US and
international, in many formats), an e-mail address, a birth date and an
address.

Search keys come from ``patient.index.search_keys`` and the rows from
``patient.records``, the functions the service writes with; only the
transport differs: PostgreSQL's COPY, with the secondary indexes built once
at the end. Two processes derive the keys while the main one copies.
"""

import argparse
import io
import json
import multiprocessing
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import make_url

from patient.index import search_keys
from patient.records import SEARCH_KEY_TABLES, patient_row, search_key_rows

ROOT = Path(__file__).resolve().parent.parent
NAMES = json.loads((Path(__file__).with_name("names.json")).read_text("utf-8"))
CHUNK = 5000
TABLES = ("patients", *(t.__tablename__ for t in SEARCH_KEY_TABLES))
PATIENT_COLUMNS = (
    "id",
    "version",
    "resource",
    "active",
    "gender",
    "birth_date_start",
    "birth_date_end",
    "last_updated",
    "created_at",
)
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.4.642.99.1"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
RACES = tuple(
    {"system": "urn:oid:2.16.840.1.113883.6.238", "code": code, "display": text}
    for code, text in (
        ("2106-3", "White"),
        ("2054-5", "Black or African American"),
        ("2028-9", "Asian"),
        ("1002-5", "American Indian or Alaska Native"),
        ("2076-8", "Native Hawaiian or Other Pacific Islander"),
    )
)

# Syllables of made-up names in other scripts: prefix searches then meet
# accents, case rules and word shapes beyond ASCII.
SYLLABLES = {
    script: tuple(words.split())
    for script, words in {
        "latin": "ma ri jo sé lu ca ño ré zé an to ni el la ber na dó mi gu ël "
        "fra nço is ãe bjør ke ša ži ć ło ű ő al ve ro çe",
        "greek": "Ελ έ νη Γε ώρ γι ος Κω στα ντί νος Πα πα δό που λος Μα ρί α",
        "cyrillic": "Ив ан ов Сер гей Ми ха ил На та ша Ко валь ен ко Ёл ки Жу",
        "arabic": "مح مد أح علي حس ن فا طم ة عا ئش مر يم خا لد عم ر يو سف",
        "japanese": "さ く ら た な か ゆ き ひ ろ し ま つ も と が わ",
    }.items()
}
CJK_FAMILY = "张王李赵陈刘杨黄周吴徐孙胡朱高林何郭马罗"
CJK_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"
SCRIPT_SHARE = (
    ("real", 60),
    ("latin", 14),
    ("greek", 6),
    ("cyrillic", 7),
    ("cjk", 6),
    ("japanese", 3),
    ("arabic", 4),
)
AREA_CODES = (201, 212, 213, 305, 312, 415, 503, 508, 512, 617, 702, 718, 781, 978)
PHONE_FORMATS = ("({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "+1 {a} {e} {l}")
FOREIGN_PHONES = (
    "+44 20 7946 {l}",
    "+61 3 9{e} {l}",
    "+49 30 {e}{l}",
    "+33 1 4{e} {l}",
    "+81 3 {l} {l}",
)
CITIES = (
    ("Boston", "MA", "02118", "US"),
    ("Springfield", "MA", "01103", "US"),
    ("Amsterdam", None, "1024 RJ", "NL"),
    ("Stockholm", None, "141 34", "SE"),
    ("Athina", None, "104 31", "GR"),
    ("Kyiv", None, "01001", "UA"),
)


def main(argv=None):
    args = _parser().parse_args(argv)
    started = time.monotonic()
    _create_and_migrate(args.db_uri)
    conn = _connect(args.db_uri)
    _check_empty(conn, args.replace)

    indexes = _drop_indexes(conn)
    copied = 0
    chunks = [
        (args.seed, start, min(CHUNK, args.patients - start), args.region)
        for start in range(0, args.patients, CHUNK)
    ]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for buffers in pool.imap(_chunk, chunks):
            _copy(conn, buffers)
            copied += buffers["count"]
            print(
                f"\r{copied:,} patients, {time.monotonic() - started:.0f} s",
                end="",
                file=sys.stderr,
            )
    print(file=sys.stderr)

    print("building indexes", file=sys.stderr)
    _build_indexes(conn, indexes)
    print(f"seeded {copied:,} patients in {time.monotonic() - started:.0f} s")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-uri", required=True, help="the database to fill")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--region", default="US", help="as PHONE_REGION")
    parser.add_argument(
        "--replace", action="store_true", help="empty a database that holds patients"
    )
    return parser


def _create_and_migrate(uri):
    url = make_url(uri)
    admin = _connect(url.set(database="postgres").render_as_string(False))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
        if cur.fetchone() is None:
            cur.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database))
            )
    admin.close()
    subprocess.run(  # noqa: S603 - our own alembic, our own arguments
        [str(Path(sys.executable).with_name("alembic")), "upgrade", "head"],
        cwd=ROOT,
        env={"DB_URI": uri, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )


def _connect(uri):
    url = make_url(uri)
    params = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    return psycopg2.connect(**{k: v for k, v in params.items() if v is not None})


def _check_empty(conn, replace):
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM patients)")
        if cur.fetchone()[0]:
            if not replace:
                sys.exit("the database holds patients; --replace empties it")
            # CASCADE: appointment requests and their outbox refer to
            # patients, and a seeded database starts without them.
            cur.execute(
                "TRUNCATE patients, idempotency_records, "
                + ", ".join(TABLES[1:])
                + " RESTART IDENTITY CASCADE"
            )
    conn.commit()


def _drop_indexes(conn):
    """Drop the search key tables' primary keys and every index no
    constraint needs; return the statements that build them again.

    Building an index once over all rows is several times faster than
    keeping it up to date row by row.
    """
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT c.conrelid::regclass::text, c.conname,
                   pg_get_constraintdef(c.oid)
            FROM pg_constraint c
            WHERE c.contype = 'p' AND c.conrelid::regclass::text = ANY(%s)
            """,
            (list(TABLES[1:]),),
        )
        keys = cur.fetchall()
        for table, name, _ in keys:
            cur.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    sql.Identifier(table), sql.Identifier(name)
                )
            )
        cur.execute(
            """
            SELECT i.indexname, i.indexdef FROM pg_indexes i
            WHERE i.schemaname = 'public' AND i.tablename = ANY(%s)
              AND NOT EXISTS (
                SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname
              )
            """,
            (list(TABLES),),
        )
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    conn.commit()
    return [
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)
        )
        for table, name, definition in keys
    ] + [sql.SQL(definition) for _, definition in indexes]


def _build_indexes(conn, statements):
    with conn.cursor() as cur:
        cur.execute("SET maintenance_work_mem = '512MB'")
        for statement in statements:
            cur.execute(statement)
        conn.commit()
        conn.autocommit = True
        for table in TABLES:
            cur.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))


def _copy(conn, buffers):
    with conn.cursor() as cur:
        # The foreign keys hold by construction; checking them row by row
        # would double the load time.
        cur.execute("SET session_replication_role = replica")
        for table, columns in _columns().items():
            cur.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN",
                io.StringIO(buffers[table]),
            )
        cur.execute("SET session_replication_role = DEFAULT")
    conn.commit()


def _columns():
    key_columns = {
        t.__tablename__: [c.name for c in t.__table__.columns if c.name != "id"]
        for t in SEARCH_KEY_TABLES
    }
    return {"patients": list(PATIENT_COLUMNS), **key_columns}


def _chunk(job):
    seed, start, count, region = job
    rng = random.Random(f"{seed}:{start}")
    columns = _columns()
    out = {table: io.StringIO() for table in columns}
    for number in range(start, start + count):
        resource, created = _patient(rng, number)
        patient_id = uuid.UUID(resource["id"])
        keys = search_keys(resource, region)
        row = patient_row(patient_id, 1, resource, created, keys, created_at=created)
        _write(out["patients"], row, columns["patients"])
        for table, rows in zip(
            SEARCH_KEY_TABLES, search_key_rows(patient_id, keys), strict=True
        ):
            for key_row in rows:
                _write(out[table.__tablename__], key_row, columns[table.__tablename__])
    return {"count": count, **{t: b.getvalue() for t, b in out.items()}}


def _write(buffer, row, columns):
    buffer.write("\t".join(_field(row[c]) for c in columns))
    buffer.write("\n")


def _field(value):
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    elif isinstance(value, datetime | date):
        value = value.isoformat()
    else:
        value = str(value)
    return (
        value.replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )


def _patient(rng, number):
    """One patient resource, as the service would store it."""
    script = rng.choices(
        [s for s, _ in SCRIPT_SHARE], weights=[w for _, w in SCRIPT_SHARE]
    )[0]
    gender = rng.choice(("female", "male", "female", "male", "other", "unknown"))
    born = date(1920, 1, 1) + timedelta(days=rng.randrange(105 * 365))
    created = NOW - timedelta(seconds=rng.randrange(3 * 365 * 86400))
    family, given = _name(rng, script)
    name = {"use": "official", "family": family, "given": given}
    if rng.random() < 0.15:
        name["prefix"] = [rng.choice(("Mr.", "Mrs.", "Ms.", "Dr."))]
    city, state, postcode, country = rng.choice(CITIES)
    address = {
        "use": "home",
        "line": [f"{rng.randrange(1, 999)} {rng.choice(NAMES['family'])} Street"],
        "city": city,
        "postalCode": postcode,
        "country": country,
    }
    if state:
        address["state"] = state
    ascii_name = "".join(c for c in given[0].lower() if c.isascii() and c.isalpha())
    resource = {
        "resourceType": "Patient",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "meta": {
            "versionId": "1",
            "lastUpdated": created.isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
        },
        "extension": [
            {
                "url": US_CORE + "us-core-race",
                "extension": [
                    {"url": "ombCategory", "valueCoding": rng.choice(RACES)},
                    {"url": "text", "valueString": "Race"},
                ],
            },
            {
                "url": US_CORE + "us-core-birthsex",
                "valueCode": {"female": "F", "male": "M"}.get(gender, "UNK"),
            },
        ],
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                        }
                    ]
                },
                "system": MRN_SYSTEM,
                "value": f"MRN-{number:08d}",
            },
            {"system": SSN_SYSTEM, "value": f"9{number:08d}"},
        ],
        "active": rng.random() > 0.03,
        "name": [name],
        "telecom": [
            {"system": "phone", "value": _phone(rng), "use": "home"},
            {
                "system": "email",
                "value": f"{ascii_name or 'patient'}.{number}@example.org",
            },
        ],
        "gender": gender,
        "birthDate": born.isoformat(),
        "address": [address],
        "maritalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                    "code": rng.choice("MSWDU"),
                }
            ]
        },
        "communication": [
            {
                "language": {
                    "coding": [
                        {
                            "system": "urn:ietf:bcp:47",
                            "code": rng.choice(("en", "es", "el", "ru", "zh", "ar")),
                        }
                    ]
                },
                "preferred": True,
            }
        ],
    }
    return resource, created


def _name(rng, script):
    if script == "real":
        # Long-tailed: a few names are common, most are rare.
        family = NAMES["family"][_ranked(rng, len(NAMES["family"]))]
        given = [NAMES["given"][_ranked(rng, len(NAMES["given"]))]]
        if rng.random() < 0.4:
            given.append(NAMES["given"][_ranked(rng, len(NAMES["given"]))])
        return family, given
    if script == "cjk":
        given = "".join(rng.choice(CJK_GIVEN) for _ in range(rng.randint(1, 2)))
        return rng.choice(CJK_FAMILY), [given]
    return _syllables(rng, script, 2, 4), [_syllables(rng, script, 2, 3)]


def _syllables(rng, script, low, high):
    word = "".join(rng.choice(SYLLABLES[script]) for _ in range(rng.randint(low, high)))
    return word[:1].upper() + word[1:]


def _ranked(rng, size):
    """A rank where the first names are common (the first about 4 %) and
    most are rare, scattered over the alphabet."""
    return int(size * rng.random() ** 2) * 7919 % size


def _phone(rng):
    exchange, line = rng.randrange(200, 999), f"{rng.randrange(10000):04d}"
    if rng.random() < 0.15:
        return rng.choice(FOREIGN_PHONES).format(e=exchange, l=line)
    return rng.choice(PHONE_FORMATS).format(
        a=rng.choice(AREA_CODES), e=exchange, l=line
    )


if __name__ == "__main__":
    main()
