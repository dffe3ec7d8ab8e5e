"""The control channel between processes: PostgreSQL LISTEN / NOTIFY on one channel.

What the messages mean and who acts on them is `scheduler.app.control`; this module only sends
them and holds the listening connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from scheduler.store.conn import Conn

NOTIFY = "SELECT pg_notify($1, $2)"
PING = "SELECT 1"


class Listening:
    """A connection listening on the channel, while `ControlChannel.listen` holds it."""

    def __init__(self, conn: Conn):
        self._conn = conn

    async def ping(self) -> None:
        """A round trip on the listening connection: raises when it is dead (notifications
        would stop silently otherwise)."""
        await self._conn.execute(PING)


class ControlChannel:
    def __init__(self, pool: asyncpg.Pool, channel: str):
        self._pool = pool
        self.channel = channel

    async def notify(self, kind: str, **fields: Any) -> None:
        """Send {"kind": kind, **fields} to every listening replica."""
        await self._pool.execute(NOTIFY, self.channel, json.dumps({"kind": kind, **fields}))

    @asynccontextmanager
    async def listen(self, heard: Callable[[str], None]) -> AsyncIterator[Listening]:
        """Hold a pool connection listening on the channel; `heard(payload)` is called with
        each notification's payload until the block ends."""

        def callback(conn: Conn, pid: int, channel: str, payload: object) -> None:
            heard(str(payload))  # asyncpg passes the payload as text

        async with self._pool.acquire() as conn:
            await conn.add_listener(self.channel, callback)
            try:
                yield Listening(conn)
            finally:
                await conn.remove_listener(self.channel, callback)
