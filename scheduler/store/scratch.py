"""A database of its own for a run (`reminders simulate`, bench/twelve_weeks.py), dropped after."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from scheduler.errors import StoreError


@asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of `server_url`; yields its URL, drops it after."""
    name = f"reminders_sim_{secrets.token_hex(6)}"
    await _admin(server_url, f"CREATE DATABASE {name}")
    try:
        # Nothing here needs to survive a crash: commits need not wait for the disk.
        await _admin(server_url, f"ALTER DATABASE {name} SET synchronous_commit = off")
        yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    finally:
        await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _admin(server_url: str, statement: str) -> None:
    try:
        conn = await asyncpg.connect(server_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
