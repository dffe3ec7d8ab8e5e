"""The database-backed CLI commands, run in-process on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from scheduler.cli import main

PLANS = Path(__file__).parents[2] / "plans"


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(PLANS))
    return db_url


def fetch(db_url: str, query: str) -> list[asyncpg.Record]:
    """Sync on purpose: the CLI runs its own event loop, so these tests are not async."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db_url)
        try:
            return await conn.fetch(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_db_upgrade_is_idempotent(env, capsys):
    assert main(["db", "upgrade"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_enroll_a_relative_plan_computes_the_first_due_step(env, capsys):
    code = main(
        [
            "enroll",
            "rehab-weekly",
            "--user",
            "oABC",
            "--start",
            "2026-03-02T10:00+08:00",
            "--tz",
            "Asia/Shanghai",
            "--var",
            "patient=张三",
            "--var",
            "hospital=协和",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "first step due 2026-03-09T09:00:00+08:00" in capsys.readouterr().out
    [row] = fetch(env, "SELECT plan_id, user_id, tz, vars, next_step FROM enrollments")
    assert (row["plan_id"], row["user_id"], row["tz"], row["next_step"]) == (
        "rehab-weekly",
        "oABC",
        "Asia/Shanghai",
        0,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enroll", "no-such-plan", "--user", "o1"], "no plan 'no-such-plan'"),
        (
            ["enroll", "rehab-weekly", "--user", "o1", "--var", "patient=x"],
            "needs --var for: hospital",
        ),
        (
            ["enroll", "commute-line2", "--user", "o1", "--start", "tomorrow"],
            "is not an ISO date-time",
        ),
        (
            ["enroll", "commute-line2", "--user", "o1", "--tz", "Mars/Olympus"],
            "is not an IANA time zone",
        ),
        (["enroll", "commute-line2", "--user", "o1", "--var", "novalue"], "write key=value"),
    ],
    ids=["unknown-plan", "missing-variable", "bad-start", "bad-zone", "bad-var"],
)
def test_enroll_rejects_bad_input_plainly(env, capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert fetch(env, "SELECT * FROM enrollments") == []


def consent(template: str, kind: str, result: str) -> int:
    return main(
        ["consent", "--user", "o1", "--template", template, "--kind", kind, "--result", result]
    )


def load_rehab_plan(capsys) -> None:
    """Enrolling loads the plan (one-time consent, template rehab_guidance_tmpl)."""
    start, variables = (
        ["--start", "2026-03-02T10:00+08:00"],
        ["--var", "patient=x", "--var", "hospital=y"],
    )
    code = main(["enroll", "rehab-weekly", "--user", "o1", *start, *variables])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def test_consent_accumulates_one_time_credits_and_keeps_history(env, capsys):
    load_rehab_plan(capsys)
    for result in ("accept", "accept", "filter"):
        assert consent("rehab_guidance_tmpl", "one_time", result) == 0
    [state] = fetch(env, "SELECT credits, long_term, banned FROM consent")
    assert dict(state) == {"credits": 2, "long_term": False, "banned": False}
    history = fetch(env, "SELECT result, source FROM consent_events ORDER BY id")
    assert [(r["result"], r["source"]) for r in history] == [
        ("accept", "cli"),
        ("accept", "cli"),
        ("filter", "cli"),
    ]


@pytest.mark.parametrize(
    ("template", "kind", "says"),
    [
        ("nope", "one_time", "no loaded plan uses template nope"),
        ("rehab_guidance_tmpl", "long_term", "is one_time in its plans, not long_term"),
    ],
)
def test_consent_is_refused_as_the_api_refuses_it(env, capsys, template, kind, says):
    load_rehab_plan(capsys)
    assert consent(template, kind, "accept") == 1
    assert says in capsys.readouterr().err
    assert fetch(env, "SELECT * FROM consent_events") == []


def test_unreachable_database_is_reported_plainly(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to PostgreSQL" in err and "Traceback" not in err


def test_run_refuses_to_start_on_an_invalid_policy(tmp_path, monkeypatch, capsys):
    (tmp_path / "policy.yaml").write_text("caps:\n  user_day: 0\n")
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")  # never reached

    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "policy.yaml" in err and "caps.user_day" in err
    assert "Traceback" not in err


def test_lifecycle_commands_act_once_and_refuse_plainly(env, capsys):
    assert main(["enroll", "pension-monthly", "--user", "oOps", "--var", "name=王五"]) == 0
    steps = [
        (["pause", "pension-monthly", "--reason", "wrong date"], "is now paused"),
        (["resume", "pension-monthly", "--reason", "fixed"], "is now active"),
        (["opt-out", "oOps", "--reason", "asked"], "user oOps / every plan"),
        (["opt-in", "oOps", "--reason", "asked again"], "opt in: user oOps"),
        (["stop-enrollment", "pension-monthly", "oOps", "--reason", "moved"], "stop enrollment"),
        (["cancel", "pension-monthly", "--reason", "programme over"], "is now cancelled"),
    ]
    capsys.readouterr()
    for args, expected in steps:
        assert main(args) == 0, capsys.readouterr().err
        assert expected in capsys.readouterr().out

    assert main(["resume", "pension-monthly", "--reason", "again"]) == 1
    err = capsys.readouterr().err
    assert "pension-monthly" in err and "cancelled" in err and "Traceback" not in err
    actions = fetch(env, "SELECT action, actor FROM plan_events ORDER BY id")
    assert [r["action"] for r in actions][-6:] == [
        "pause",
        "resume",
        "opt_out",
        "opt_in",
        "stop_enrollment",
        "cancel",
    ]
    assert all(r["actor"].startswith("cli:") for r in actions[-6:])
