"""End to end: a one-time plan sends exactly as many messages as the user granted credits, then
skips with no_consent; every page carries the tracking parameter, and an open is tied back."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from scheduler.app.dispatcher import Dispatcher
from scheduler.channels.wechat import WeChatChannel
from scheduler.store.consent import ConsentStore
from scheduler.store.postgres import Store
from scheduler.testing.fake_wechat import FakeWeChat
from tests.ingest_helpers import INGEST, ONE_TIME_TEMPLATE, register, rehab_plan, serve
from tests.ops_helpers import fake_fixture  # noqa: F401 - a fixture
from tests.support import Clock
from tests.wechat_pushes import event, popup, signed_query, to_xml

USER = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
START = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # Monday 10:00 in Shanghai


async def test_one_time_plan_sends_as_many_as_granted_then_skips(store: Store, fake: FakeWeChat):
    plan = rehab_plan(count=5)
    await register(store, plan)
    channel = WeChatChannel(base_url=fake.base_url, appid="app", secret="s", retries=1)
    clock = Clock(START)
    dispatcher = Dispatcher(store, channel, replica_id="e2e", clock=clock)
    async with serve(store) as api:
        enrolled = await api.post(
            "/v1/enrollments",
            headers=INGEST,
            json={
                "plan_id": "rehab",
                "openid": USER,
                "start": START.isoformat(),
                "tz": "Asia/Shanghai",
                "variables": {"patient": "张三"},
            },
        )
        assert enrolled.status_code == 201
        # Two accepts reported by the backend, a third pushed by WeChat (a separate tap).
        for popup_id in ("p1", "p2"):
            body = {
                "openid": USER,
                "kind": "one_time",
                "results": {ONE_TIME_TEMPLATE: "accept"},
                "id": popup_id,
                "at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            }
            assert (
                await api.post("/v1/consent", headers=INGEST, json={"popups": [body]})
            ).is_success
        push = event(
            "subscribe_msg_popup_event", USER, [popup(ONE_TIME_TEMPLATE)], int(time.time())
        )
        assert (
            await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(push))
        ).text == ("success")

        runway = (await api.get("/v1/plans/rehab/runway", headers=INGEST)).json()
        assert runway["runs_dry"][0]["steps_covered"] == 3
        assert runway["runs_dry"][0]["dry_step"] == 4

        for week in range(1, 6):
            clock.now = START + timedelta(weeks=week)
            await dispatcher.fire("rehab", clock.now)

        rows = await store.pool.fetch(
            "SELECT id, step, status, reason FROM deliveries ORDER BY step"
        )
        assert [(r["step"], r["status"], r["reason"]) for r in rows] == [
            (1, "sent", None),
            (2, "sent", None),
            (3, "sent", None),
            (4, "skipped", "no_consent"),
            (5, "skipped", "no_consent"),
        ]
        assert len(fake.messages) == 3
        assert await store.pool.fetchval("SELECT credits FROM consent") == 0

        # Every page carries the delivery it came from, after the plan's own query.
        first = fake.messages[0]
        parts = urlsplit(first["page"])
        assert parts.path == "pages/rehab/index"
        assert parse_qs(parts.query) == {"from": ["notice"], "rmd": [str(rows[0]["id"])]}
        opened = await api.post(
            "/v1/opens",
            headers=INGEST,
            json={"opens": [{"openid": USER, "scene": 1014, "rmd": rows[0]["id"]}]},
        )
        assert opened.json() == {"recorded": 1, "duplicates": 0}

    await channel.aclose()
    consent = ConsentStore(store.pool)
    history = [h["result"] for h in await consent.history(USER, ONE_TIME_TEMPLATE)]
    assert history == ["accept", "accept", "accept", "consume", "consume", "consume"]
    assert await consent.mismatches() == {}
