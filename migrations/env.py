"""Alembic environment: migrates the database named by ``DB_URI``."""

import os
from logging.config import fileConfig

from alembic import context

from patient.db import DEFAULT_DB_URI, make_engine
from patient.models import Base

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)


def run_migrations_online():
    uri = context.config.attributes.get("db_uri") or os.environ.get(
        "DB_URI", DEFAULT_DB_URI
    )
    engine = make_engine(uri)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
