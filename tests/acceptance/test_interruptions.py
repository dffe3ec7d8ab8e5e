"""Interruptions of a fan-out, the way a hostile world delivers them: the daemon as a process,
killed (-9) or stopped (SIGTERM) at random moments, a second replica, PostgreSQL restarting, and
WeChat replies that never come. After each, every enrolled user is counted: one final outcome
in the ledger, at most one message at the fake, `unknown` only for what was on the wire.

The trials are bench/crash_trials.py's, with small numbers (the bench runs 20 x 20,000).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.crash_trials import run_trial

CONCURRENCY = 16
FAST = {"concurrency": CONCURRENCY, "batch_size": 100, "chunk_size": 400, "lease_seconds": 4.0}


def assert_every_user_once(result, *, unknown_at_most: int) -> None:  # noqa: ANN001
    assert result.duplicates == 0, result.line()
    assert result.lost == 0, result.line()
    assert result.pending == 0, result.line()
    assert result.unknown <= unknown_at_most, result.line()


async def test_kill_9_at_random_moments_loses_nothing_and_sends_nothing_twice(
    db_url: str, tmp_path: Path
) -> None:
    rng = random.Random()  # a new moment every run; the seed is in the failure's message
    seed = rng.randrange(1 << 30)
    result = await run_trial(db_url, tmp_path, users=3000, kills=3, rng=random.Random(seed), **FAST)
    assert result.signals == 3
    # Each kill may leave at most the sends it had on the wire unknown.
    assert_every_user_once(result, unknown_at_most=3 * CONCURRENCY)
    assert result.unknown > 0, f"seed {seed}: no kill landed mid-send: {result.line()}"


async def test_the_survivor_finishes_when_the_sending_replica_is_killed(
    db_url: str, tmp_path: Path
) -> None:
    result = await run_trial(
        db_url, tmp_path, users=3000, replicas=2, restart=False, timeout_s=120, **FAST
    )
    assert_every_user_once(result, unknown_at_most=CONCURRENCY)
    assert result.down == 1, result.line()  # the victim stayed down: the survivor did the rest
    logs = "".join((tmp_path / f"r{i}.log").read_text() for i in range(2))
    assert "is gone (silent for" in logs  # it took over the victim's chunks and claimed rows


async def test_sigterm_mid_fan_out_finishes_in_flight_and_a_restart_finishes_the_rest(
    db_url: str, tmp_path: Path
) -> None:
    result = await run_trial(db_url, tmp_path, users=3000, sig=signal.SIGTERM, **FAST)
    assert_every_user_once(result, unknown_at_most=0)  # a clean stop leaves nothing unknown
    assert result.exit_codes == [0], result.line()
    log = (tmp_path / "r0.log").read_text()
    assert "stopped" in log and "Traceback" not in log


async def test_two_replicas_share_one_occurrence(db_url: str, tmp_path: Path) -> None:
    result = await run_trial(
        db_url,
        tmp_path,
        users=6000,
        replicas=2,
        kills=0,
        **{**FAST, "concurrency": 4},  # slow senders: the occurrence lasts long enough to share
    )
    assert_every_user_once(result, unknown_at_most=0)
    assert sorted(result.shares) == ["r0", "r1"], result.line()
    assert min(result.shares.values()) >= 6000 / 3, result.line()


async def test_lost_replies_are_unknown_and_never_sent_twice(db_url: str, tmp_path: Path) -> None:
    result = await run_trial(db_url, tmp_path, users=2000, kills=0, lose_replies=0.05, **FAST)
    assert result.duplicates == 0 and result.lost == 0 and result.pending == 0, result.line()
    # About 5 % of the messages reached WeChat without an answer: each is unknown, none resent.
    assert 40 <= result.unknown <= 200, result.line()


@pytest.fixture
def private_server() -> Iterator[object]:
    """A PostgreSQL of this test's own, so restarting it disturbs no other test."""
    import pgserver

    data_dir = Path(tempfile.mkdtemp(prefix="reminders-restart-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_a_postgresql_restart_mid_fan_out_is_survived(private_server, tmp_path: Path) -> None:  # noqa: ANN001
    from pgserver._commands import pg_ctl

    async def restart_postgres() -> None:
        await asyncio.to_thread(
            pg_ctl,
            ["-w", "-m", "fast", "restart"],
            pgdata=private_server.pgdata,
            user=private_server.system_user,
            timeout=30,
        )

    result = await run_trial(
        private_server.get_uri(), tmp_path, users=3000, on_kill=restart_postgres, **FAST
    )
    assert_every_user_once(result, unknown_at_most=CONCURRENCY)
    assert result.down == 0, result.line()  # the daemon stayed up through the outage
    log = (tmp_path / "r0.log").read_text()
    assert "retrying" in log  # it did see the outage
