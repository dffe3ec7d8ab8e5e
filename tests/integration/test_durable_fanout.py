"""The durable fan-out on a real PostgreSQL and a fake WeChat on loopback: occurrences as chunks
any replica takes, the flight record that bounds `unknown`, recovery of a replica that left,
pause/cancel mid fan-out, and the progress that status shows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from scheduler.app.dispatcher import FanOutReport, occurrence_key
from scheduler.app.lifecycle import Lifecycle
from scheduler.app.status import overview, render_overview
from scheduler.domain.plan import Plan
from scheduler.store.postgres import ClaimBatch, Due, Fenced, SendRate, Store
from tests.ops_helpers import channel_fixture, eventually, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, calendar_plan, dispatcher, register

FIRE = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


async def audience(store: Store, n: int, plan: Plan | None = None) -> list[str]:
    plan = plan or calendar_plan()
    await register(store, plan)
    await store.pool.execute(
        "INSERT INTO enrollments (plan_id, user_id, start_at, tz, vars)"
        " SELECT $1, 'o-' || lpad(i::text, 5, '0'), $2, 'Asia/Shanghai', '{\"who\": \"x\"}'"
        " FROM generate_series(1, $3) AS i",
        plan.id,
        FIRE,
        n,
    )
    await store.pool.execute(
        "INSERT INTO consent (user_id, template_id, long_term)"
        " SELECT user_id, 'tmpl_alert', true FROM enrollments"
    )
    return [r["user_id"] for r in await store.pool.fetch("SELECT user_id FROM enrollments")]


async def at_least(store: Store, n: int, query: str) -> None:
    async def reached() -> bool:
        return await store.pool.fetchval(query) >= n

    await eventually(reached, what=query)


async def claim(store: Store, replica: str, users: list[str]) -> list:
    """Claim the users' rows of the occurrence as `replica` would (past the gate, pending)."""
    batch = ClaimBatch("alerts", 1, "tmpl_alert", "long_term", replica)
    message = {"thing1": "x", "number2": "2"}
    return await store.claim(
        store.pool, batch, [Due(occurrence_key(FIRE), u, 2, FIRE, message) for u in users]
    )


async def outcomes(store: Store) -> dict[str, int]:
    rows = await store.pool.fetch("SELECT status, count(*) AS n FROM deliveries GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def test_an_occurrence_is_recorded_once_as_chunks_covering_every_user(store, fake, channel):
    users = await audience(store, 250)
    fanout = store.fanout
    first = await fanout.record_occurrence("alerts", occurrence_key(FIRE), 2, FIRE, 100)
    again = await fanout.record_occurrence("alerts", occurrence_key(FIRE), 2, FIRE, 100)
    chunks = await store.pool.fetch(
        "SELECT after_user, last_user FROM occurrence_chunks ORDER BY id"
    )
    assert first == again
    # (start, 100th], (100th, 200th], (200th, end): users enrolled later fall in one too.
    assert [(c["after_user"], c["last_user"]) for c in chunks] == [
        (None, users[99]),
        (users[99], users[199]),
        (users[199], None),
    ]
    assert await store.pool.fetchval("SELECT total FROM occurrences") == 250


async def test_a_chunk_reads_each_page_of_its_audience_once(store, fake, channel):
    # A chunk ends at its last user or at a short page, without a round trip that reads nothing.
    await audience(store, 230)
    pages: list[int] = []
    read = store.fanout.chunk_audience

    async def counted(chunk, after, limit):  # noqa: ANN001, ANN202
        page = await read(chunk, after, limit)
        pages.append(len(page))
        return page

    store.fanout.chunk_audience = counted
    d = dispatcher(store, channel, Clock(FIRE), batch_size=50, chunk_size=100)
    report = await d.fire("alerts", FIRE)
    assert report.sent == 230 and await outcomes(store) == {"sent": 230}
    # Chunks (start, 100th], (100th, 200th], (200th, end): two full pages, two, one short.
    assert sorted(pages) == [30, 50, 50, 50, 50]


async def test_two_replicas_share_one_occurrence_and_send_each_user_once(store, fake, channel):
    users = await audience(store, 600)
    fake.inject(latency_s=0.01, times=600)
    clock = Clock(FIRE)
    a = dispatcher(store, channel, clock, batch_size=50, chunk_size=100, concurrency=8)
    b = dispatcher(
        store, channel, clock, replica_id="other", batch_size=50, chunk_size=100, concurrency=8
    )
    active = await a.load("alerts")
    helper = FanOutReport()

    async def join() -> None:
        await at_least(store, 1, "SELECT count(*) FROM occurrences")
        await b.work(helper)

    report, _ = await asyncio.gather(a.fan_out(active, FIRE), join())

    assert report.sent > 0 and helper.sent > 0
    assert report.sent + helper.sent == 600
    assert sorted(m["touser"] for m in fake.messages) == users
    assert await store.pool.fetchval("SELECT state FROM occurrences") == "done"


async def test_sends_recorded_in_flight_never_exceed_the_concurrency(store, fake, channel):
    await audience(store, 300)
    fake.inject(latency_s=0.02, times=300)
    d = dispatcher(store, channel, Clock(FIRE), batch_size=100, concurrency=5)
    active = await d.load("alerts")
    task = asyncio.create_task(d.fan_out(active, FIRE))
    seen = []
    while not task.done():
        seen.append(
            await store.pool.fetchval(
                "SELECT coalesce(cardinality(in_flight), 0) FROM replicas WHERE id = 'test'"
            )
        )
        await asyncio.sleep(0.005)
    assert (await task).sent == 300
    assert max(x or 0 for x in seen) == 5  # reached, never passed


async def test_the_recorder_lingers_only_until_enough_sends_wait(store):
    # Authorisations wait for a round trip; a round trip waits for more to carry, but only until
    # a quarter of the slots is waiting (2 of 8 here), never its whole linger.
    from scheduler.app.flight import FlightRecorder

    users = await audience(store, 3)
    claims = await claim(store, "test", users)
    recorder = FlightRecorder(store.fanout, "test", 8, linger_s=60)
    first = asyncio.create_task(recorder.authorize(claims[0].delivery_id))
    await asyncio.sleep(0.2)
    assert not first.done()  # alone: it lingers
    second = recorder.authorize(claims[1].delivery_id)
    assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [True, True]
    in_flight = await store.pool.fetchval("SELECT in_flight FROM replicas WHERE id = 'test'")
    assert sorted(in_flight) == sorted(c.delivery_id for c in claims[:2])


async def test_a_replica_given_up_is_fenced_and_another_continues_its_chunk(store, fake, channel):
    await audience(store, 200)
    fanout = store.fanout
    await fanout.record_occurrence("alerts", occurrence_key(FIRE), 2, FIRE, 1000)
    await store.heartbeat("gone", "host", 1, starting=True)
    chunk = await fanout.take_chunk("gone")
    assert chunk is not None and not chunk.resumed
    async with fanout.chunk_batch(chunk, "gone", "o-00050"):
        pass  # it got through the first 50 users, then went silent
    await store.pool.execute("UPDATE replicas SET last_seen = now() - interval '1 minute'")
    [recovered] = await fanout.recover_dead(20)
    assert recovered.chunks == 1

    with pytest.raises(Fenced):  # had it only been slow: its next batch is refused
        async with fanout.chunk_batch(chunk, "gone", "o-00100"):
            pass
    report = FanOutReport()
    d = dispatcher(store, channel, Clock(FIRE))
    status = await overview(store, now=FIRE)
    [waiting] = status["fan_outs"]
    assert waiting["holders"] == [] and waiting["resumed"] is False
    await d.work(report)

    # It continued after the cursor: the first 50 users were the gone replica's to send.
    assert report.sent == 150
    assert sorted(m["touser"] for m in fake.messages)[0] == "o-00051"
    assert await store.pool.fetchval("SELECT takeovers FROM occurrence_chunks") == 1


async def test_status_shows_a_fan_out_under_way_its_holder_and_progress(store, fake, channel):
    await audience(store, 120)
    fanout = store.fanout
    await fanout.record_occurrence("alerts", occurrence_key(FIRE), 2, FIRE, 100)
    await fanout.take_chunk("r-busy")
    report = await overview(store, now=FIRE)
    [running] = report["fan_outs"]
    assert (running["plan_id"], running["total"], running["chunks_left"]) == ("alerts", 120, 2)
    assert running["holders"] == ["r-busy"] and running["recorded"] == 0
    text = render_overview(report)
    assert "Fan-outs under way: 1" in text and "held by r-busy" in text


async def test_a_stopping_replica_gives_back_what_it_did_not_send(store, fake, channel):
    await audience(store, 200)
    fake.inject(latency_s=0.05, times=200)
    clock = Clock(FIRE)
    leaving = dispatcher(store, channel, clock, batch_size=50, concurrency=4)
    active = await leaving.load("alerts")
    task = asyncio.create_task(leaving.fan_out(active, FIRE))
    await at_least(store, 8, "SELECT count(*) FROM deliveries WHERE status = 'sent'")
    assert await leaving.drain(within_s=5)  # SIGTERM: in-flight sends finish
    await task
    # What the daemon does on SIGTERM after the drain: its chunk and the rows it claimed but did
    # not send go back to the pool; nothing was on the wire any more.
    given_back = await store.fanout.recover("test")
    assert (given_back.unknown, given_back.chunks) == (0, 1) and given_back.released > 0

    successor = dispatcher(store, channel, clock, replica_id="successor")
    report = FanOutReport()
    await successor.work_released(report)
    await successor.work(report)

    assert await outcomes(store) == {"sent": 200}
    assert len(fake.messages) == 200 == len({m["touser"] for m in fake.messages})
    assert report.sent == 200 - (
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE claimed_by = 'test'")
    )


async def test_pause_mid_fan_out_keeps_the_rest_for_the_resume(store, fake, channel):
    await audience(store, 100)
    fake.inject(latency_s=0.05, times=100)
    clock = Clock(FIRE)
    d = dispatcher(store, channel, clock, batch_size=10, concurrency=2)
    lifecycle = Lifecycle(store, clock=clock)
    active = await d.load("alerts")
    task = asyncio.create_task(d.fan_out(active, FIRE))
    await at_least(store, 10, "SELECT count(*) FROM deliveries")
    await lifecycle.pause("alerts", actor="test", reason="checking")
    assert (await task).stopped
    left = await store.pool.fetchval(
        "SELECT count(*) FROM occurrence_chunks WHERE state = 'todo' AND owner IS NULL"
    )
    assert left == 1  # the occurrence waits, nobody holds it

    await lifecycle.resume("alerts", actor="test", catch_up=True)
    report = FanOutReport()
    await d.work(report)
    assert await outcomes(store) == {"sent": 100}
    assert await store.pool.fetchval("SELECT state FROM occurrences") == "done"


async def test_cancel_mid_fan_out_closes_the_occurrence(store, fake, channel):
    await audience(store, 100)
    fake.inject(latency_s=0.05, times=100)
    clock = Clock(FIRE)
    d = dispatcher(store, channel, clock, batch_size=10, concurrency=2)
    active = await d.load("alerts")
    task = asyncio.create_task(d.fan_out(active, FIRE))
    await at_least(store, 10, "SELECT count(*) FROM deliveries")
    result = await Lifecycle(store, clock=clock).cancel("alerts", actor="test", reason="over")
    await task
    assert result.details["occurrences_closed"] == 1
    assert await store.pool.fetchval("SELECT state FROM occurrences") == "done"
    assert await store.fanout.take_chunk("anyone") is None


async def test_a_claimed_row_no_pipeline_holds_goes_back_to_the_pool(store, fake, channel):
    # A claim committed while its reply was lost (the database restarted at that moment): the
    # row is pending under a live replica that does not know it.
    await audience(store, 2)
    [stray, held] = await claim(store, "test", ["o-00001", "o-00002"])
    await store.pool.execute("UPDATE deliveries SET claimed_at = now() - interval '1 minute'")
    d = dispatcher(store, channel, Clock(FIRE))
    d._queued.add(held.delivery_id)  # this one a pipeline of the replica still holds

    assert await d.release_strays(20) == 1
    assert await d.release_strays(20) == 0
    d._queued.clear()
    report = FanOutReport()
    await d.work_released(report)
    assert report.sent == 1 and [m["touser"] for m in fake.messages] == [stray.user_id]


def resending_plan() -> Plan:
    data = calendar_plan().model_dump(mode="json")
    data["delivery"]["resend_unknown"] = True
    return Plan.model_validate(data)


async def test_a_plan_that_opts_in_sends_an_unknown_again(store, fake, channel):
    await audience(store, 3, resending_plan())
    fake.inject_lost_replies(reply="drop")  # the first send's reply never comes
    d = dispatcher(store, channel, Clock(FIRE))
    report = await d.fire("alerts", FIRE)
    assert (report.sent, report.resent) == (2, 1)
    again = FanOutReport()
    await d.work_released(again)

    assert again.sent == 1 and await outcomes(store) == {"sent": 3}
    received = sorted(m["touser"] for m in fake.messages)
    assert len(received) == 4 and len(set(received)) == 3  # the price: one user got it twice


async def test_in_flight_sends_of_a_plan_that_opts_in_go_back_to_the_pool(store, fake, channel):
    await audience(store, 1, resending_plan())
    [row] = await claim(store, "gone", ["o-00001"])
    assert await store.fanout.record_flight("gone", [], [row.delivery_id], []) == (
        {row.delivery_id},
        set(),
    )
    recovered = await store.fanout.recover("gone")
    assert (recovered.unknown, recovered.released) == (0, 1)


async def test_replicas_closing_the_last_chunks_at_once_close_the_occurrence(store):
    await audience(store, 20)
    for n in range(15):  # a race: give it many chances
        fire = FIRE.replace(hour=n)
        await store.fanout.record_occurrence("alerts", occurrence_key(fire), 2, fire, 10)
        chunks = [await store.fanout.take_chunk(f"r{i}") for i in range(3)]
        await asyncio.gather(
            *(store.fanout.release_chunk(c, f"r{i}", done=True) for i, c in enumerate(chunks))
        )
    states = await store.pool.fetch("SELECT state FROM occurrences")
    assert [r["state"] for r in states] == ["done"] * 15


async def test_the_send_rate_holds_across_two_replicas(store, fake, channel):
    """REMINDERS_SEND_RATE is per app, shared through PostgreSQL: two replicas together stay
    under it, measured by the times the fake WeChat received the messages."""
    users = await audience(store, 120)
    rate = SendRate("app", 20.0)
    clock = Clock(FIRE)
    # Few sends in flight and short batches: a replica holds a chunk or two at a time while the
    # bucket paces it, so the other one finds chunks to take (with 64 in flight, one replica
    # could claim the whole occurrence before the other joined).
    pace = {"batch_size": 10, "chunk_size": 30, "concurrency": 4, "send_rate": rate}
    a = dispatcher(store, channel, clock, **pace)
    b = dispatcher(store, channel, clock, replica_id="other", **pace)
    active = await a.load("alerts")
    helper = FanOutReport()

    async def join() -> None:
        await at_least(store, 1, "SELECT count(*) FROM occurrences")
        await b.work(helper)

    report, _ = await asyncio.gather(a.fan_out(active, FIRE), join())

    assert report.sent > 0 and helper.sent > 0  # both replicas sent
    assert sorted(m["touser"] for m in fake.messages) == users
    times = sorted(m["received_at"] for m in fake.messages)
    overall = (len(times) - 1) / (times[-1] - times[0])
    # The limit is a ceiling; the floor only says the bucket refills (a loaded machine is slower).
    assert 8 <= overall <= 20 * 1.05
    # No second carries more than the rate plus the bucket (2) and a little network jitter.
    busiest = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
    assert busiest <= 20 + 2 + 2


async def test_stopping_a_plans_occurrences_while_a_chunk_is_released_does_not_deadlock(store):
    """Damage control stops a plan's occurrences while a replica lets one of its chunks go:
    both take the occurrence before its chunks, so one waits for the other (it deadlocked when
    the stop took the chunks first)."""
    await audience(store, 50)
    occurrence_id = await store.fanout.record_occurrence(
        "alerts", occurrence_key(FIRE), 2, FIRE, 10
    )
    async with store.pool.acquire() as releasing, releasing.transaction():
        # release_chunk's order: the occurrence, then the chunk.
        await releasing.execute("SELECT 1 FROM occurrences WHERE id = $1 FOR UPDATE", occurrence_id)
        stopping = asyncio.create_task(
            store.fanout.stop_occurrences("alerts", "r1", "skipped", "template_banned", "43107")
        )
        await asyncio.sleep(0.5)  # the stop is waiting now
        await releasing.execute(
            "UPDATE occurrence_chunks SET owner = NULL WHERE occurrence_id = $1", occurrence_id
        )
    recorded = await asyncio.wait_for(stopping, 10)
    assert recorded == 50
    assert await store.pool.fetchval("SELECT state FROM occurrences") == "done"


async def test_jsonb_goes_compact_in_utf8_and_a_lone_surrogate_is_still_refused(store):
    import asyncpg

    from scheduler.store.postgres import _encode_jsonb

    message = {"thing1": "康复训练第3周", "time2": "09:00"}
    assert _encode_jsonb(message) == b"\x01" + '{"thing1":"康复训练第3周","time2":"09:00"}'.encode()
    assert await store.pool.fetchval("SELECT $1::jsonb", message) == message
    with pytest.raises(asyncpg.exceptions.DataError):  # refused, as before: not a crash
        await store.pool.fetchval("SELECT $1::jsonb", {"thing1": "\ud800"})
