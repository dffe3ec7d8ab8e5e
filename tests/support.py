"""What the tests share: a hand-moved clock, plans from dicts, registering plans, an empty
database between generated examples. Tests import helpers from here, never from each other."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from scheduler.domain.plan import Plan
from scheduler.store.postgres import Store

Now = TypeVar("Now", datetime, float)


class Clock(Generic[Now]):
    """Virtual time: the code under test calls it, the test sets `now`."""

    def __init__(self, now: Now):
        self.now = now

    def __call__(self) -> Now:
        return self.now


def plan_of(document: dict[str, Any]) -> Plan:
    return Plan.model_validate(document)


async def register(store: Store, plan: Plan) -> None:
    """Load a plan as the daemon would from a file (source `test`)."""
    await store.register_plan(plan, "test")


async def reset_database(store: Store) -> None:
    """Hypothesis runs many examples in one test (one database): start each from empty."""
    tables = await store.pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'schema_migrations'"
    )
    names = ", ".join(f'"{t["tablename"]}"' for t in tables)
    await store.pool.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
