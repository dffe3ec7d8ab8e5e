"""Content variants (docs/plans.md, docs/engagement.md) through the real dispatcher and gate and a
fake WeChat on loopback: the ledger records each user's variant as the assignment says, the
messages carry the variant's text, a second dispatcher (a restart) assigns the same variants, and
`reminders report --by variant` counts each variant's sends, opens and cancellations with their
95 % Wilson intervals."""

from __future__ import annotations

import asyncio
import copy
import csv
import io
from collections import Counter
from datetime import UTC, datetime

import httpx
import yaml

from scheduler import simulate
from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.app import engagement
from scheduler.app.lifecycle import Lifecycle
from scheduler.app.status import plan_status, render_plan
from scheduler.cli import main
from scheduler.domain.consent import Result
from scheduler.domain.engagement import wilson
from scheduler.domain.messages import variant_for
from scheduler.domain.plan import ConsentKind
from scheduler.domain.policy import Policy
from scheduler.planfiles import load_plans
from scheduler.store.consent import ConsentReport, OpenReport
from tests.ingest_helpers import ADMIN_ONLY, settings
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, dispatcher, plan_of, register

TEMPLATE = "tmpl_var"
PLAN = plan_of(
    {
        "id": "wording",
        "name": "Wording trial",
        "category": "transport",
        "consent": "long_term",
        "schedule": {
            "calendar": {
                "timezone": "Asia/Shanghai",
                "daily": {"at": "09:00"},
                "start": "2026-03-01",
            },
            "grace": "1 hour",
        },
        "template": {"id": TEMPLATE, "fields": {"thing1": "thing", "number2": "number"}},
        "message": {
            "default": {"thing1": "Tip {step}", "number2": "{step}"},
            # every step without variants of its own: a user keeps one of these
            "variants": {
                "short": {"weight": 1, "fields": {"thing1": "Tip {step}!"}},
                "long": {"weight": 1, "fields": {"thing1": "Your tip of day {step}"}},
            },
            "steps": {
                2: {
                    "variants": {
                        "gentle": {"weight": 2, "fields": {"thing1": "Take it easy {step}"}},
                        "direct": {"weight": 1, "fields": {"thing1": "Do it now {step}"}},
                    }
                }
            },
        },
    }
)
USERS = [f"oVar{i:02d}" for i in range(30)]
TEXT = {
    "gentle": "Take it easy {step}",
    "direct": "Do it now {step}",
    "short": "Tip {step}!",
    "long": "Your tip of day {step}",
}


def at(day: int, hour: int = 1, minute: int = 0) -> datetime:
    """March `day`, 2026, UTC: 09:00 in Shanghai."""
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


async def ledger(store) -> list[dict]:
    rows = await store.pool.fetch(
        "SELECT id, user_id, step, status, variant, message FROM deliveries"
        " WHERE plan_id = $1 ORDER BY step, user_id",
        PLAN.id,
    )
    return [dict(r) for r in rows]


async def test_each_user_gets_the_assigned_variant_across_a_restart_and_reports_count_them(
    store, fake, channel, db_url, capsys, monkeypatch, tmp_path
):
    await register(store, PLAN)
    for user in USERS:
        await store.enroll(PLAN.id, user, at(1), "Asia/Shanghai", {}, None)
        await store.record_consent(user, TEMPLATE, "long_term", "accept", "test")
    clock = Clock(at(2, 1, 1))
    first = dispatcher(store, channel, clock, replica_id="first")
    step = await first.fire(PLAN.id, at(2))
    assert step.sent == len(USERS)
    # A restart: a new dispatcher in its place (nothing kept in memory) sends steps 3 and 4.
    second = dispatcher(store, channel, clock, replica_id="second")
    for day in (3, 4):
        clock.now = at(day, 1, 1)
        assert (await second.fire(PLAN.id, at(day))).sent == len(USERS)

    rows = await ledger(store)
    assert len(rows) == 3 * len(USERS) and {r["status"] for r in rows} == {"sent"}
    assert all(r["variant"] == variant_for(PLAN, r["step"], r["user_id"]) for r in rows)
    by_step = {s: Counter(r["variant"] for r in rows if r["step"] == s) for s in (2, 3, 4)}
    assert set(by_step[2]) == {"gentle", "direct"} and set(by_step[3]) == {"short", "long"}
    # the message-wide variants are one per user: the same at step 3 and step 4
    variant_at = {(r["step"], r["user_id"]): r["variant"] for r in rows}
    assert all(variant_at[3, u] == variant_at[4, u] for u in USERS)
    # the ledger's message and the one WeChat got carry the variant's text
    for r in rows:
        assert r["message"]["thing1"] == TEXT[r["variant"]].format(step=r["step"])
    got = {(m["touser"], m["data"]["number2"]): m["data"]["thing1"] for m in fake.messages}
    assert got == {
        (r["user_id"], str(r["step"])): TEXT[r["variant"]].format(step=r["step"]) for r in rows
    }

    # Step 2: every `gentle` user opens it; the first two `direct` users cancel after it.
    step2 = [r for r in rows if r["step"] == 2]
    gentle = [r for r in step2 if r["variant"] == "gentle"]
    direct = [r for r in step2 if r["variant"] == "direct"]
    await store.consent.record_opens(
        [OpenReport(r["user_id"], 1014, at(2, 3), r["id"], "test") for r in gentle]
    )
    await store.consent.record(
        [
            ConsentReport(
                r["user_id"],
                TEMPLATE,
                Result.REJECT,
                "test",
                kind=ConsentKind.LONG_TERM,
                occurred_at=at(2, 12),
            )
            for r in direct[:2]
        ]
    )

    now = at(5)
    report = await engagement.report(store, PLAN.id, now=now, by="variant")
    assert report is not None
    lines = {(r["step"], r["variant"]): r for r in report["rows"]}
    assert set(lines) == {(2, "direct"), (2, "gentle"), (3, "long"), (3, "short"),
                          (4, "long"), (4, "short")}  # fmt: skip
    g, d = lines[2, "gentle"], lines[2, "direct"]
    assert (g["sent"], g["opened"], g["cancelled"]) == (len(gentle), len(gentle), 0)
    assert (d["sent"], d["opened"], d["cancelled"]) == (len(direct), 0, 2)
    assert d["cancellation_rate_ci"] == list(wilson(2, len(direct)) or ())
    assert g["click_through_ci"] == list(wilson(len(gentle), len(gentle)) or ())
    assert sum(r["sent"] for r in report["rows"]) == 3 * len(USERS)

    # The table: each variant's rates with their intervals.
    table = engagement.render(report, "table").splitlines()
    assert table[1].split("  ")[0] == "VERSION" and "CTR 95% CI" in table[1]
    direct_line = next(line for line in table if line.split()[2:3] == ["direct"])
    low, high = wilson(2, len(direct)) or (0, 0)
    assert f"{low * 100:.1f}-{high * 100:.1f}%" in direct_line

    # `reminders status PLAN` has a line per variant, and its intervals.
    status = await plan_status(store, PLAN.id, now=now)
    assert status is not None
    text = render_plan(status)
    assert "v1 step 2 direct" in text and "95% CI: CTR" in text

    # The admin API answers the same rows, intervals included.
    app = create_app(settings(plans_dir=tmp_path), store, lifecycle=Lifecycle(store, clock=clock))
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            response = await client.get(
                f"/v1/plans/{PLAN.id}/engagement?by=variant", headers=ADMIN_ONLY
            )
    finally:
        await server.stop()
    assert response.status_code == 200, response.text
    served = {(r["step"], r["variant"]): r for r in response.json()["rows"]}
    assert served[2, "direct"]["cancellation_rate_ci"] == d["cancellation_rate_ci"]

    # `reminders report --by variant --format csv` (the CLI runs its own loop: in a thread).
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(tmp_path))
    capsys.readouterr()
    argv = ["report", PLAN.id, "--by", "variant", "--format", "csv"]
    assert await asyncio.to_thread(main, argv) == 0
    out = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    counted = {(int(r["step"]), r["variant"]): int(r["sent"]) for r in out}
    assert counted == {k: by_step[k[0]][k[1]] for k in lines}
    row = next(r for r in out if r["variant"] == "direct")
    assert (row["cancelled"], row["cancellation_rate_ci_low"]) == ("2", str(low))


async def test_simulate_shows_each_users_variant(db_url, tmp_path):
    """`reminders simulate`'s timelines name the variant each simulated user got."""
    folder = tmp_path / "plans"
    folder.mkdir()
    (folder / "wording.yaml").write_text(
        yaml.safe_dump(PLAN.model_dump(mode="json"), allow_unicode=True), encoding="utf-8"
    )
    loaded, problems = load_plans([folder])
    assert problems == []
    plans = [item.plan for item in loaded]
    start, end = at(2), at(5)
    users = simulate.audience(
        plans,
        simulate.parse_consent(None, plans),
        users=12,
        tz="Asia/Shanghai",
        start=start,
        end=end,
        variables={},
    )
    report = await simulate.run(db_url, loaded, Policy(), users, start, end)
    rows = [(user, row) for user, lines in report.timeline.items() for row in lines]
    assert len(rows) == 12 * 3 and {row.status for _, row in rows} == {"sent"}
    assert all(row.variant == variant_for(PLAN, row.step, user) for user, row in rows)
    text = simulate.render(report)
    assert "step   2  sent [variant gentle]" in text or "step   2  sent [variant direct]" in text
    assert {r["variant"] for t in simulate.as_json(report)["timeline"].values() for r in t} == {
        "gentle", "direct", "short", "long"
    }  # fmt: skip


async def test_a_deferred_send_keeps_its_variant_and_text_through_a_plan_edit(store, fake, channel):
    """A message deferred by quiet hours waits in the ledger with its variant and text: the
    retry sends that message, even after an edit rewrote (and renamed) the step's variants."""
    late = PLAN.model_dump(mode="json")
    late["schedule"]["calendar"]["daily"] = {"at": "23:00"}  # in transport's quiet hours
    first = plan_of(late)
    await register(store, first)
    for user in USERS[:9]:
        await store.enroll(first.id, user, at(1), "Asia/Shanghai", {}, None)
        await store.record_consent(user, TEMPLATE, "long_term", "accept", "test")
    clock = Clock(at(2, 15, 1))  # 23:01 in Shanghai
    await dispatcher(store, channel, clock).fire(first.id, at(2, 15))
    held = await ledger(store)
    assert {r["status"] for r in held} == {"deferred"}
    assert all(r["variant"] == variant_for(first, 2, r["user_id"]) for r in held)

    edited = copy.deepcopy(late)
    edited["message"]["steps"]["2"]["variants"] = {
        "calm": {"weight": 1, "fields": {"thing1": "Rewritten {step}"}}
    }
    await register(store, plan_of(edited))
    clock.now = at(2, 22, 1)  # 06:01 in Shanghai: the quiet hours are over
    await dispatcher(store, channel, clock, replica_id="restarted").retry_deferred(first.id)
    sent = await ledger(store)
    assert {r["status"] for r in sent} == {"sent"}
    assert [(r["user_id"], r["variant"], r["message"]) for r in sent] == [
        (r["user_id"], r["variant"], r["message"]) for r in held
    ]
    assert sorted((m["touser"], m["data"]["thing1"]) for m in fake.messages) == sorted(
        (r["user_id"], TEXT[r["variant"]].format(step=2)) for r in held
    )
