"""The cluster-wide gauges of /metrics, read from PostgreSQL at each scrape (indexed, cheap).

Every replica reads the same shared state, so each reports the same values for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from scheduler.store.status import LIVE_REPLICA_COUNT, REPLICA_ALIVE_S

DUE_STEPS_PER_PLAN = (
    "SELECT plan_id, count(*) AS n FROM enrollments"
    " WHERE status = 'active' AND next_due_at <= now() GROUP BY plan_id"
)
CATCH_UP_PER_PLAN = "SELECT plan_id, count(*) AS n FROM catch_up GROUP BY plan_id"
IN_FLIGHT_PER_PLAN = (
    "SELECT plan_id, count(*) AS n FROM deliveries WHERE status = 'pending' GROUP BY plan_id"
)
PLANS_PER_STATE = "SELECT state, count(*) AS n FROM plans GROUP BY state"
PLAN_FILE_PROBLEM_COUNT = "SELECT count(*) FROM plan_problems"


@dataclass(frozen=True)
class ClusterGauges:
    """Counts by plan id (plans with none are left out), plans by state, and two totals."""

    due_steps: dict[str, int]  # active enrolments whose next step is past due
    catch_up: dict[str, int]  # occurrences a resume queued
    in_flight: dict[str, int]  # sends claimed and not yet answered
    plans: dict[str, int]  # plans by state (states without plans are left out)
    replicas_alive: int
    plan_file_problems: int


class MetricsStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def cluster_gauges(self) -> ClusterGauges:
        """The gauges' values now, read on one connection."""
        async with self._pool.acquire() as conn:

            async def per(query: str) -> dict[str, int]:
                return {r[0]: r["n"] for r in await conn.fetch(query)}

            return ClusterGauges(
                due_steps=await per(DUE_STEPS_PER_PLAN),
                catch_up=await per(CATCH_UP_PER_PLAN),
                in_flight=await per(IN_FLIGHT_PER_PLAN),
                plans=await per(PLANS_PER_STATE),
                replicas_alive=await conn.fetchval(LIVE_REPLICA_COUNT, REPLICA_ALIVE_S),
                plan_file_problems=await conn.fetchval(PLAN_FILE_PROBLEM_COUNT),
            )
