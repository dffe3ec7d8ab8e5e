"""The daemon: plans folder -> APScheduler schedules on PostgreSQL -> the dispatcher.

One APScheduler schedule per plan (id `plan:<plan id>`), whose only argument is the plan id:
calendar plans get their own trigger; relative plans get a sweep every `sweep_seconds` that sends
the steps due in the enrolments table. Every sweep period too, deferred sends whose moment came go
through the gate again, and the engagement guard judges the plans' recent cancellations.
Schedules are (re)added only when a plan's content changed, with triggers that start
at `now`, so no past occurrence fires on a re-add.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler import (
    AsyncScheduler,
    CoalescePolicy,
    ConflictPolicy,
    JobOutcome,
    JobReleased,
    ScheduleLookupError,
    current_job,
)
from apscheduler.abc import Trigger
from apscheduler.datastores.sqlalchemy import SQLAlchemyDataStore
from apscheduler.eventbrokers.asyncpg import AsyncpgEventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.ext.asyncio import create_async_engine

from scheduler.app import metrics
from scheduler.app.dispatcher import Clock, Dispatcher, FanOutReport, utc_now
from scheduler.app.engagement_guard import EngagementGuard
from scheduler.app.ledger import prune
from scheduler.app.lifecycle import Lifecycle, LifecycleError
from scheduler.channels.base import Channel
from scheduler.domain.plan import Plan
from scheduler.domain.plan_state import PlanState
from scheduler.domain.schedule import calendar_anchor, calendar_trigger, relative_due
from scheduler.planfiles import LoadedPlan, load_policy
from scheduler.settings import Settings
from scheduler.store.embedded import database_url, sqlalchemy_url
from scheduler.store.postgres import (
    SCHEDULER_SETUP_LOCK,
    PlanRecord,
    Recovered,
    SendRate,
    Store,
    retry_transient,
)

log = logging.getLogger(__name__)

TASK_ID = "fire_plan"
APSCHEDULER_SCHEMA = "apscheduler"
HEARTBEAT_SECONDS = 5.0
LEDGER_CARE_SECONDS = 24 * 3600  # partitions ahead and the prune: once a day

# The APScheduler task must be an importable function with plain-string arguments; it reaches the
# running daemon's dispatcher through this module-level slot, set once at start-up.
_dispatcher: Dispatcher | None = None


async def fire_plan(plan_id: str) -> None:
    """The APScheduler task: one fire of a plan's schedule, at its scheduled time."""
    if _dispatcher is None:  # pragma: no cover - only a misconfigured process gets here
        raise RuntimeError("fire_plan ran outside a reminders daemon")
    fire_time = current_job.get().scheduled_fire_time
    assert fire_time is not None  # APScheduler sets it on every job a schedule starts
    await _dispatcher.fire(plan_id, fire_time)


def schedule_id(plan_id: str) -> str:
    return f"plan:{plan_id}"


def has_credentials(settings: Settings) -> bool:
    return bool(settings.wechat_appid and settings.wechat_secret)


def replica_identity(settings: Settings) -> str:
    return settings.replica_id or socket.gethostname()


@dataclass
class SyncResult:
    added: list[str]
    unchanged: list[str]
    finished: list[str]


class Daemon:
    """The running scheduler: owns the APScheduler instance and keeps plans in sync with it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        channel: Channel,
        scheduler: AsyncScheduler,
        *,
        replica_id: str,
        clock: Clock = utc_now,
    ):
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.replica_id = replica_id
        self.clock = clock
        self.lifecycle = Lifecycle(store, clock=clock)
        self.dispatcher = Dispatcher(
            store,
            channel,
            replica_id=replica_id,
            concurrency=settings.send_concurrency,
            batch_size=settings.batch_size,
            chunk_size=settings.chunk_size,
            clock=clock,
            send_rate=(
                SendRate(settings.wechat_appid or "", settings.send_rate)
                if settings.send_rate
                else None
            ),
            quota_check_s=settings.quota_check_seconds,
            quota_reserves={
                "low": settings.quota_reserve_low,
                "normal": settings.quota_reserve_normal,
                "high": 0.0,
            },
            lifecycle=self.lifecycle,
        )
        self.work_available = asyncio.Event()
        self.guard = EngagementGuard(store, self.lifecycle, policy=lambda: self.dispatcher.policy)

    async def sync_plans(self, loaded: list[LoadedPlan]) -> SyncResult:
        """Record each plan's version and (re)schedule the plans whose content changed."""
        result = SyncResult([], [], [])
        for item in loaded:
            plan = item.plan
            registration = await self.store.register_plan(plan, str(item.path))
            if registration.record.state in (PlanState.CANCELLED, PlanState.COMPLETED):
                await self._remove_schedule(plan.id)  # over: an edit does not revive it
                result.unchanged.append(plan.id)
                continue
            if not registration.changed and await self._has_schedule(plan.id):
                result.unchanged.append(plan.id)
                continue
            if plan.is_relative and registration.record.version > 1:
                await self.store.reschedule_enrollments(plan.id, _next_due_computer(plan))
            # Up to ~1 s for the slowest legal schedule: off the event loop.
            trigger = await asyncio.to_thread(self._trigger, plan, registration.record)
            if trigger is None:
                result.finished.append(plan.id)
                await self._remove_schedule(plan.id)
                if registration.record.state is PlanState.ACTIVE:  # its count or end is reached
                    try:
                        await self.lifecycle.complete(
                            plan.id, actor="daemon", reason="no occurrence left"
                        )
                    except LifecycleError as exc:  # another replica was first
                        log.debug("plan %s: %s", plan.id, exc)
                continue
            await self.scheduler.add_schedule(
                TASK_ID,
                trigger,
                id=schedule_id(plan.id),
                args=[plan.id],
                coalesce=CoalescePolicy.all,
                misfire_grace_time=plan.schedule.grace.as_timedelta(),
                conflict_policy=ConflictPolicy.replace,
            )
            result.added.append(plan.id)
            log.info(
                "scheduled plan %s (version %d)",
                plan.id,
                registration.record.version,
                extra={"plan_id": plan.id},
            )
        return result

    def _trigger(self, plan: Plan, record: PlanRecord) -> Trigger | None:
        now = self.clock()
        if plan.schedule.relative is not None:
            return IntervalTrigger(seconds=self.settings.sweep_seconds, start_time=now)
        cal = plan.schedule.calendar
        assert cal is not None
        anchor = calendar_anchor(cal, record.registered_at)
        # A first occurrence at the anchor (a plan with no start fires when first loaded, which
        # is a moment ago by now) is still due within the grace: it is step 1, not skipped.
        if timedelta(0) <= now - anchor <= plan.schedule.grace.as_timedelta():
            now = anchor
        return calendar_trigger(cal, anchor, now)

    async def _has_schedule(self, plan_id: str) -> bool:
        try:
            await self.scheduler.get_schedule(schedule_id(plan_id))
        except ScheduleLookupError:
            return False
        return True

    async def _remove_schedule(self, plan_id: str) -> None:
        if await self._has_schedule(plan_id):
            await self.scheduler.remove_schedule(schedule_id(plan_id))

    async def on_job_released(self, event: JobReleased) -> None:
        """APScheduler dropped a fire past its grace (`misfire_grace_time`): record it missed."""
        if (
            event.outcome is JobOutcome.missed_start_deadline
            and event.scheduler_id == self.replica_id
            and event.schedule_id
            and event.schedule_id.startswith("plan:")
            and event.scheduled_start is not None
        ):
            plan_id = event.schedule_id.removeprefix("plan:")
            try:
                await self.dispatcher.record_missed(plan_id, event.scheduled_start)
            except Exception:  # an event callback must not take the scheduler down
                log.exception("could not record the missed occurrence of plan %s", plan_id)

    async def retry_deferred_forever(self) -> None:
        """Every sweep period, the deferred sends whose moment has come go through the gate
        again (any replica may take them: their rows are locked with SKIP LOCKED), cap
        counters of windows long past are forgotten, and the ledger's count deltas are folded
        into its counts (so status never reads more than a sweep period of them)."""
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                for plan_id in await self.store.plans_with_due_deferrals(self.clock()):
                    await self.dispatcher.retry_deferred(plan_id)
                await self.store.prune_cap_counters(self.clock())
                await self.store.status.roll_up()
            except Exception:  # the database may be briefly away: try again next period
                log.exception("retrying deferred sends failed")

    async def ledger_care_forever(self) -> None:
        """At start and once a day: the ledger's partitions ahead are made, and its months past
        retention that nothing needs any more are dropped (scheduler/app/ledger.py), exported
        first into REMINDERS_LEDGER_EXPORT_DIR when it is set."""
        while True:
            try:
                report = await prune(
                    self.store,
                    retention_months=self.settings.ledger_retention_months,
                    now=self.clock(),
                    actor=f"daemon:{self.replica_id}",
                    export_dir=self.settings.ledger_export_dir,
                )
                kept = [
                    p for p in report.kept if p.month is not None and p.keep != "within retention"
                ]
                for partition in kept:
                    log.info(
                        "ledger month %s kept past retention: %s", partition.label, partition.keep
                    )
            except Exception:  # the database may be briefly away: try again in an hour
                log.exception("the ledger's daily care failed")
                await asyncio.sleep(3600)
                continue
            await asyncio.sleep(LEDGER_CARE_SECONDS)

    async def guard_forever(self) -> None:
        """Every sweep period, the engagement guard judges the active plans with recent sends
        and pauses those whose cancellations say so (docs/engagement.md, "The guard"); one
        replica at a time (the others skip that period)."""
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                async with self.store.engagement.guard_turn() as mine:
                    if mine:
                        await self.guard.check()
            except Exception:  # the database may be briefly away: try again next period
                log.exception("the engagement guard's check failed")

    async def heartbeat_forever(self) -> None:
        """Renew this replica's lease, and take over the work of replicas whose lease ran out."""
        host, pid = socket.gethostname(), os.getpid()
        while True:
            await asyncio.sleep(min(HEARTBEAT_SECONDS, self.settings.lease_seconds / 4))
            try:
                await self.store.heartbeat(self.replica_id, host, pid)
                recovered = await self.store.fanout.recover_dead(self.settings.lease_seconds)
                strays = await self.dispatcher.release_strays(self.settings.lease_seconds)
            except Exception as exc:  # the database may be briefly away: keep beating
                log.warning("heartbeat failed: %s", exc)
                continue
            if strays:
                log.warning("%d claimed rows no pipeline held went back to the pool", strays)
                self.work_available.set()
            for r in recovered:
                log.warning(
                    "replica %s is gone (silent for %g s): %d sends it had in flight are "
                    "'unknown', %d claimed rows and %d chunks are back in the pool",
                    r.replica,
                    self.settings.lease_seconds,
                    r.unknown,
                    r.released,
                    r.chunks,
                )
            if recovered:
                self.work_available.set()

    async def work_forever(self) -> None:
        """Take occurrence chunks and rows given back to the pool, whoever fired them; look
        again every `work_poll_seconds` (or at once when this replica learns of new work)."""
        report = FanOutReport()
        while not self.dispatcher.stopping.is_set():
            try:
                await self.dispatcher.work_released(report)
                await self.dispatcher.work(report)
            except Exception:  # the database is away past the retries: look again later
                log.exception("taking occurrence work failed")
            report.stopped = False
            try:
                await asyncio.wait_for(self.work_available.wait(), self.settings.work_poll_seconds)
            except TimeoutError:
                pass
            self.work_available.clear()

    async def stop_working(self) -> None:
        """A clean stop: no new batch, the sends in flight finish (within drain_seconds) and
        are recorded, and what this replica held goes back to the pool for the others."""
        if not await self.dispatcher.drain(within_s=self.settings.drain_seconds):
            log.warning(
                "sends still in flight after %g s: they are recorded as 'unknown'",
                self.settings.drain_seconds,
            )
        r: Recovered = await retry_transient(10, what="giving the work back")(
            self.store.fanout.recover, self.replica_id
        )
        if r.unknown or r.released or r.chunks:
            log.info(
                "stopped with %d sends unknown, %d claimed rows and %d chunks back in the pool",
                r.unknown,
                r.released,
                r.chunks,
            )


def _next_due_computer(plan: Plan) -> Callable[[datetime, str, int], datetime | None]:
    from zoneinfo import ZoneInfo

    rule = plan.schedule.relative
    assert rule is not None

    def compute(start_at: datetime, tz: str, index: int) -> datetime | None:
        return relative_due(rule, start_at, ZoneInfo(tz), index)

    return compute


async def open_channel(settings: Settings, stack: AsyncExitStack) -> Channel:
    """The WeChat channel; without credentials, a fake WeChat on loopback that we start."""
    from scheduler.channels.wechat import WeChatChannel

    base_url, appid, secret = (
        settings.wechat_api_base,
        settings.wechat_appid,
        settings.wechat_secret,
    )
    if not has_credentials(settings):
        from scheduler.testing.fake_wechat import FakeWeChat

        fake = FakeWeChat(log_messages=True)
        base_url = await fake.start("127.0.0.1", settings.fake_wechat_port)
        stack.push_async_callback(fake.stop)
        appid, secret = "fake-appid", "fake-secret"
        log.warning(
            "No WeChat credentials (REMINDERS_WECHAT_APPID / REMINDERS_WECHAT_SECRET): sending to "
            "a FAKE WeChat at %s. Nothing reaches real users. "
            "Read what it received at %s/fake/messages",
            base_url,
            base_url,
        )
    assert appid is not None and secret is not None  # has_credentials(settings), or the fake's
    channel = WeChatChannel(
        base_url=base_url,
        appid=appid,
        secret=secret,
        timeout=settings.wechat_timeout,
        retries=settings.wechat_retries,
        miniprogram_state=settings.miniprogram_state,
        lang=settings.lang,
        on_errcode=metrics.count_errcode,
        # A connection for every send slot: a pool smaller than the concurrency would cap it.
        max_connections=max(settings.send_concurrency, 256),
    )
    stack.push_async_callback(channel.aclose)
    return channel


async def build_scheduler(
    store: Store, url: str, replica_id: str, stack: AsyncExitStack
) -> AsyncScheduler:
    """APScheduler on the same database: its tables in their own schema, JSON-serialised."""
    engine = create_async_engine(sqlalchemy_url(url), pool_size=5)
    stack.push_async_callback(engine.dispose)
    scheduler = AsyncScheduler(
        SQLAlchemyDataStore(engine, schema=APSCHEDULER_SCHEMA, serializer=JSONSerializer()),
        AsyncpgEventBroker.from_async_sqla_engine(engine),
        identity=replica_id,
        cleanup_interval=timedelta(minutes=5),
    )
    # Its data store creates the schema and tables with IF NOT EXISTS, which still races when
    # two replicas start together (unique violation on pg_namespace): take turns.
    async with store.exclusively(SCHEDULER_SETUP_LOCK):
        await stack.enter_async_context(scheduler)
    # Configure the task once and schedule by its id, which keeps this limit (see DESIGN.md).
    await scheduler.configure_task(TASK_ID, func=fire_plan, max_running_jobs=100)
    return scheduler


YOUNG_GC_THRESHOLD = 20_000


def settle_heap() -> None:
    """Move what start-up built (modules, the API app, plans, the scheduler) out of the
    collector's reach: it lives as long as the process, and without this every full collection
    during a fan-out walks all of it again (bench/fanout.py: full passes cost ~1.5 s per 20,000
    sends before, ~0.4 s after).

    The youngest generation is collected after 20,000 net new container objects, not 700: a
    fan-out keeps a few thousand objects per batch alive for a moment (rows, messages, requests),
    and at 700 the collector ran every couple of milliseconds, tracing them again each time
    (about a tenth of a send's CPU; bench/fanout.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


async def run(settings: Settings, *, demo: bool = False, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (or `stop` is set); `demo` seeds demo users."""
    global _dispatcher
    # The rules every send is checked against: a running daemon keeps its last good policy when
    # the file breaks, but a starting one has none to keep, so it refuses to start (PlanError:
    # the file, the field, why).
    load_policy(settings.plans_dir)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from scheduler.app.control import ControlLoop
    from scheduler.app.watcher import PlanWatcher

    replica_id = replica_identity(settings)
    async with AsyncExitStack() as stack:
        url = database_url(settings)
        store = await stack.enter_async_context(Store.open(url))
        await store.migrate()
        await store.heartbeat(replica_id, socket.gethostname(), os.getpid(), starting=True)
        recovered = await store.fanout.recover(replica_id)
        if recovered.unknown or recovered.released:
            log.warning(
                "this replica last stopped with %d sends in flight (recorded 'unknown', never "
                "resent) and %d claimed rows not yet sent (back in the pool)",
                recovered.unknown,
                recovered.released,
            )
        channel = await open_channel(settings, stack)

        scheduler = await build_scheduler(store, url, replica_id, stack)
        daemon = Daemon(settings, store, channel, scheduler, replica_id=replica_id)
        _dispatcher = daemon.dispatcher
        watcher = PlanWatcher(
            daemon,
            settings.plans_dir,
            debounce_ms=settings.watch_debounce_ms,
            force_polling=settings.watch_force_polling,
        )
        loop.add_signal_handler(signal.SIGHUP, watcher.request_rescan, "SIGHUP")
        if settings.api_port is not None:
            from scheduler.api.app import create_app
            from scheduler.api.server import ApiServer

            api = ApiServer(
                create_app(
                    settings, store, daemon=daemon, lifecycle=daemon.lifecycle, watcher=watcher
                ),
                settings.api_host,
                settings.api_port,
            )
            await api.start()
            stack.push_async_callback(api.stop)
            log.info(
                "HTTP API on http://%s:%d (OpenAPI: /v1/openapi.json)", settings.api_host, api.port
            )

        if demo:
            from scheduler import demo as demo_data
        # Registers and schedules the valid plans, records the invalid files' problems, pauses
        # the plans whose file is gone.
        scan = await watcher.rescan(
            extra=[demo_data.demo_plan()] if demo else [],
            extra_exceptions=demo_data.DEMO_EXCEPTIONS if demo else {},
        )
        loaded, problems, synced = scan.loaded, scan.problems, scan.synced
        assert synced is not None
        if demo:
            await demo_data.seed(store, loaded, daemon.clock())
        log.info(
            "plans: %d scheduled, %d unchanged, %d finished, %d invalid",
            len(synced.added),
            len(synced.unchanged),
            len(synced.finished),
            len(problems),
        )

        scheduler.subscribe(daemon.on_job_released, JobReleased)
        await scheduler.start_in_background()
        heartbeat = asyncio.create_task(daemon.heartbeat_forever())
        working = [
            asyncio.create_task(daemon.work_forever()) for _ in range(settings.fanout_workers)
        ]
        deferred = asyncio.create_task(daemon.retry_deferred_forever())
        guarding = asyncio.create_task(daemon.guard_forever())
        ledger_care = asyncio.create_task(daemon.ledger_care_forever())
        watching = asyncio.create_task(watcher.run())
        control = asyncio.create_task(ControlLoop(daemon, watcher).run())
        settle_heap()
        log.info("reminders daemon running as replica %s", replica_id)
        await stop.wait()
        log.info("stopping: finishing the sends in flight")
        await daemon.stop_working()
        await asyncio.gather(*working, return_exceptions=True)
        heartbeat.cancel()
        deferred.cancel()
        guarding.cancel()
        ledger_care.cancel()
        watcher.stop()
        control.cancel()
        await asyncio.gather(
            watching, control, deferred, guarding, ledger_care, return_exceptions=True
        )
        loop.remove_signal_handler(signal.SIGHUP)
        await scheduler.stop()
        await scheduler.wait_until_stopped()
        await store.retire(replica_id)
    _dispatcher = None
    log.info("stopped")
