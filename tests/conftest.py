"""Shared fixtures: a real PostgreSQL for the whole run, and a fresh database per test.

`TEST_DATABASE_URL` points the suite at an existing server; otherwise a throwaway server is
started with pgserver (which runs PostgreSQL as an unprivileged user when the suite runs as root).
Each test gets its own database cloned from a migrated template, so tests never see each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from scheduler.store.postgres import Store

# One template per pytest-xdist worker: workers may share one server (TEST_DATABASE_URL).
TEMPLATE_DB = f"reminders_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a PostgreSQL server (its maintenance database) for the whole test session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    import pgserver

    # Not under pytest's basetemp: another pytest run prunes old basetemps, data dir included.
    data_dir = Path(tempfile.mkdtemp(prefix="reminders-test-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_db(pg_url: str) -> str:
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    async with Store.open(with_database(pg_url, TEMPLATE_DB)) as store:
        await store.migrate()
    return TEMPLATE_DB


@pytest.fixture
async def db_url(pg_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    finally:
        await admin.close()
    yield with_database(pg_url, name)
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with Store.open(db_url) as store:
        yield store
