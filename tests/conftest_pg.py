"""PostgreSQL fixtures (a pytest plugin: ``pytest_plugins = ["tests.conftest_pg"]``).

The server comes from ALLOCATOR_TEST_PG_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/test
when something listens there; otherwise PostgreSQL tests are skipped with the reason. Every
test gets its own freshly created database, dropped afterwards, so runs never share data.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

__all__ = ["any_store_url", "base_pg_url", "make_pg_database", "pg_url", "sqlite_url"]

_DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def base_pg_url() -> str | None:
    """The configured test server URL, or None when no PostgreSQL is reachable."""
    configured = os.environ.get("ALLOCATOR_TEST_PG_URL")
    if configured:
        return configured
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return _DEFAULT_PG_URL
    except OSError:
        return None


@contextmanager
def make_pg_database(base_url: str | None = None) -> Iterator[str]:
    """Create a uniquely named database on the test server, yield its URL, drop it."""
    base = base_url or base_pg_url()
    if base is None:
        raise RuntimeError("no PostgreSQL: set ALLOCATOR_TEST_PG_URL or run one on :5432")
    url = sa.make_url(base)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    name = f"alloc_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def sqlite_url(path: Path) -> str:
    """SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{path}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test (skips if none)."""
    base = base_pg_url()
    if base is None:
        pytest.skip("PostgreSQL not available: set ALLOCATOR_TEST_PG_URL or run one on :5432")
    with ExitStack() as stack:
        try:
            url = stack.enter_context(make_pg_database(base))
        except sa.exc.OperationalError as e:
            if os.environ.get("ALLOCATOR_TEST_PG_URL"):
                raise
            pytest.skip(f"PostgreSQL at {base} can't create a test database: {e.orig}")
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL, once for a SQLite file and once for a PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "allocator.sqlite")
    return str(request.getfixturevalue("pg_url"))
