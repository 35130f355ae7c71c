"""Alembic environment: migrates the connection the store hands over, else `sqlalchemy.url`.

`SqlStore.open` runs `upgrade head` itself; this file also lets an operator run the
`alembic` CLI against a database (``alembic -x ... -c <ini with script_location>``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool


def _run(connection: Connection) -> None:
    # SQLite runs DDL inside transactions fine; the store wraps the whole upgrade in one
    # BEGIN IMMEDIATE so a crash mid-upgrade leaves the previous schema intact.
    context.configure(
        connection=connection,
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url, or pass a connection in config.attributes")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    _run_online()
