"""The store's ports: what the application side (app/, api/, the CLIs) may ask of the database.

Each port is a small `typing.Protocol` with one real implementation under `scheduler/store/`;
the application never holds a pool or writes SQL. Sections are grouped by what they serve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from scheduler.store.metrics import ClusterGauges


# -- read models (status, metrics, control) --


class StatusReads(Protocol):
    """The reads behind `reminders status`, the admin API's status routes and `reminders health`
    (implemented by `scheduler.store.status.StatusStore`). Rows are plain dicts keyed by column."""

    async def ping(self) -> None:
        """One round trip: raises when the database does not answer (readiness)."""

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        """The plan with its current version (definition, source_file, loaded_at) and its
        number of versions; None when no such plan is loaded."""

    async def last_state_change(
        self, plan_id: str, actions: Sequence[str]
    ) -> dict[str, Any] | None:
        """The plan's newest audit event among `actions`, or None."""

    async def upcoming_steps(self, plan_id: str, now: datetime, limit: int) -> list[dict[str, Any]]:
        """A relative plan's next due times after `now` with the users due at each."""

    async def overdue_steps(self, plan_id: str, now: datetime) -> int:
        """Active enrolments whose next step is due at or before `now`."""

    async def catch_up_queued(self, plan_id: str) -> int:
        """Occurrences a resume queued and not yet fanned out."""

    async def enrolments_by_status(self, plan_id: str) -> dict[str, int]:
        """The plan's enrolments counted by status."""

    async def roll_up(self) -> int:
        """Fold the ledger's count deltas into its counts; -1: another roll-up was running."""

    async def outcome_counts(self, plan_id: str | None, now: datetime) -> list[dict[str, Any]]:
        """Ledger rows due by `now` per (status, reason), for one plan or all (None)."""

    async def last_errors(self, plan_id: str, limit: int) -> list[dict[str, Any]]:
        """The plan's newest failed or unknown sends."""

    async def file_problems_of(self, plan_id: str, source_file: str | None) -> list[dict[str, Any]]:
        """Rejected plan files of the plan or at its source file."""

    async def first_due_step(self, plan_id: str) -> datetime | None:
        """The earliest next step of the plan's active enrolments."""

    async def plans(self) -> list[dict[str, Any]]:
        """Every plan with its current version's definition, by id."""

    async def outcome_counts_per_plan(self, now: datetime) -> list[dict[str, Any]]:
        """Ledger rows due by `now` per (plan, status)."""

    async def active_enrolments_per_plan(self) -> dict[str, int]:
        """Active enrolments by plan."""

    async def consent_of_active_enrolments(self) -> list[dict[str, Any]]:
        """Active enrolments per plan and the consent state of its template."""

    async def last_errors_anywhere(self, limit: int) -> list[dict[str, Any]]:
        """The newest failed or unknown sends of any plan."""

    async def file_problems(self) -> list[dict[str, Any]]:
        """Every rejected plan file."""

    async def replicas(self) -> list[dict[str, Any]]:
        """Replicas seen in the last day or stopped cleanly, alive ones first."""

    async def replica_alive(self, replica_id: str) -> bool:
        """Whether this replica's heartbeat is recent."""

    async def live_replica_count(self) -> int:
        """How many replicas have a recent heartbeat."""


class EngagementReads(Protocol):
    """What deliveries led to: sends, deliveries, opens, attributed cancellations
    (`scheduler.store.engagement.EngagementStore`; the attribution rule is its docstring)."""

    async def rows(
        self,
        plan_id: str,
        *,
        now: datetime,
        window: timedelta,
        start: datetime | None = None,
        end: datetime | None = None,
        tz: str = "UTC",
    ) -> list[dict[str, Any]]:
        """The plan's accepted sends due in [start, end) counted per (plan_version, step,
        variant, day in `tz`, age against `now`) with sent, delivered, opened, cancelled."""

    async def plan_ids(self) -> list[str]:
        """Every plan's id."""

    async def guard_counts(
        self,
        plan_id: str,
        *,
        since: datetime,
        recent_from: datetime,
        until: datetime,
        window: timedelta,
        leave_out: list[tuple[datetime, datetime]],
    ) -> list[dict[str, Any]]:
        """The engagement guard's counts: accepted sends due in [since, until) per (recent,
        plan_version, step), with sent and cancelled, leaving out the `leave_out` spans."""

    async def guarded_plans(self, since: datetime, until: datetime) -> list[str]:
        """Active plans with an accepted send due in [since, until]."""

    async def judged_spans(
        self, plan_id: str, *, actor: str, since: datetime
    ) -> list[tuple[datetime, datetime]]:
        """The due-time spans the plan's automatic pauses by `actor` judged, since `since`."""

    def guard_turn(self) -> AbstractAsyncContextManager[bool]:
        """True while this replica holds the guard's turn, False when another one does."""


class ClusterGaugeReads(Protocol):
    """The shared-state gauges of /metrics (`scheduler.store.metrics.MetricsStore`)."""

    async def cluster_gauges(self) -> ClusterGauges:
        """The gauges' values now."""


class ListeningConnection(Protocol):
    async def ping(self) -> None:
        """A round trip on the listening connection; raises when it is dead."""


class ControlNotifications(Protocol):
    """The control channel every replica listens on (`scheduler.store.control.ControlChannel`)."""

    async def notify(self, kind: str, **fields: Any) -> None:
        """Send {"kind": kind, **fields} to every listening replica."""

    def listen(
        self, heard: Callable[[str], None]
    ) -> AbstractAsyncContextManager[ListeningConnection]:
        """Listen while the block runs; `heard(payload)` gets each notification's payload."""


class SimulationReads(Protocol):
    """What `reminders simulate` reads between moments of virtual time, and its one write
    (`scheduler.store.simulation.SimulationStore`)."""

    async def register_all_at(self, moment: datetime) -> None:
        """Stamp every plan as registered at `moment` (virtual time)."""

    async def next_relative_due(
        self, plan_ids: Sequence[str], after: datetime, before: datetime
    ) -> datetime | None:
        """The earliest next step of an active enrolment in `plan_ids` in (after, before)."""

    async def next_deferred_retry(self, after: datetime) -> datetime | None:
        """The earliest moment after `after` a deferred send is to be tried again."""

    async def deferred(self) -> list[dict[str, Any]]:
        """Every deferred ledger row now."""

    async def ledger(self) -> list[dict[str, Any]]:
        """Every ledger row, by due time, plan and user."""

    async def sent_by_msgid(self, msgids: Sequence[int]) -> list[dict[str, Any]]:
        """The ledger rows of the sends WeChat answered with `msgids`."""

    async def active_enrolments(self, plan_id: str) -> list[dict[str, Any]]:
        """The plan's active enrolments (user_id, start_at, tz, next_step)."""

    async def unfinished(self) -> list[dict[str, Any]]:
        """Ledger rows still pending or deferred."""
