"""The type of a database connection in the store's annotations.

A connection from a pool is asyncpg's `PoolConnectionProxy`, which has a `Connection`'s methods
without being one; a function that runs statements on either takes a `Conn`.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
