"""The live plans folder: a Daemon on a real APScheduler and PostgreSQL, files written for real."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from scheduler.app.daemon import Daemon
from scheduler.app.status import overview, render_overview
from scheduler.app.watcher import PlanWatcher
from scheduler.domain import limits
from tests.ops_helpers import eventually, permissive_policy_in
from tests.support import DAILY, daemon_on, next_fire


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A plans folder whose policy lets every test plan through."""
    folder = tmp_path / "plans"
    folder.mkdir()
    return permissive_policy_in(folder)


@asynccontextmanager
async def watching(
    store, db_url, folder: Path, name: str = "daily.yaml"
) -> AsyncIterator[tuple[Daemon, PlanWatcher, Path]]:
    """A daemon and its watcher on `folder`, with the plan `daily` loaded from the file `name`."""
    async with daemon_on(store, db_url) as daemon:
        watcher = PlanWatcher(daemon, folder)
        file = folder / name
        file.write_text(DAILY.format(at="09:00", count=30))
        await watcher.rescan()
        yield daemon, watcher, file


async def plan_state(store, plan_id: str) -> tuple[str, int, str | None]:
    record = await store.pool.fetchrow(
        "SELECT state, current_version, state_reason FROM plans WHERE id = $1", plan_id
    )
    return (record["state"], record["current_version"], record["state_reason"])


async def test_add_edit_invalid_edit_delete_and_restore(store, db_url, folder: Path):
    async with daemon_on(store, db_url) as daemon:
        watcher = PlanWatcher(daemon, folder)
        file = folder / "daily.yaml"
        file.write_text(DAILY.format(at="09:00", count=30))
        report = await watcher.rescan()
        assert report.synced.added == ["daily"]
        assert await plan_state(store, "daily") == ("active", 1, None)

        # An edit is a new version; a changed time recomputes the next fire from now.
        daemon.clock.now = daemon.clock.now.replace(day=20)
        file.write_text(DAILY.format(at="08:00", count=30))
        await watcher.rescan()
        assert await plan_state(store, "daily") == ("active", 2, None)
        assert (await next_fire(daemon.scheduler, "daily")).isoformat() == (
            "2026-03-21T00:00:00+00:00"
        )

        # A half-written / invalid edit: rejected, visible, and version 2 keeps running.
        file.write_text(DAILY.format(at="08:00", count=30).replace("transport", "spaceflight"))
        report = await watcher.rescan()
        assert report.problems and await plan_state(store, "daily") == ("active", 2, None)
        problem = await store.pool.fetchrow("SELECT plan_id, problems FROM plan_problems")
        assert problem["plan_id"] == "daily"
        assert any(p["field"] == "category" for p in problem["problems"])
        await watcher.rescan()  # the same problem again is not a new audit event
        trail = await daemon.lifecycle.audit(plan_id="daily")
        assert [e["action"] for e in trail].count("file_rejected") == 1

        file.write_text(DAILY.format(at="08:00", count=30))
        await watcher.rescan()
        assert await store.pool.fetchval("SELECT count(*) FROM plan_problems") == 0

        # Deleting the file pauses the plan; nothing is lost; restoring it resumes it.
        file.unlink()
        report = await watcher.rescan()
        assert report.paused == ["daily"]
        assert await plan_state(store, "daily") == ("paused", 2, "file removed")
        file.write_text(DAILY.format(at="08:00", count=30))
        report = await watcher.rescan()
        assert report.resumed == ["daily"]
        assert await plan_state(store, "daily") == ("active", 2, "file restored")
        actions = [e["action"] for e in reversed(await daemon.lifecycle.audit(plan_id="daily"))]
        assert actions == ["loaded", "loaded", "file_rejected", "pause", "resume"]


async def test_an_admin_pause_is_not_undone_by_the_file(store, db_url, folder: Path):
    async with daemon_on(store, db_url) as daemon:
        watcher = PlanWatcher(daemon, folder)
        (folder / "daily.yaml").write_text(DAILY.format(at="09:00", count=30))
        await watcher.rescan()
        await daemon.lifecycle.pause("daily", actor="token:ops", reason="complaints")
        await watcher.rescan()
        assert await plan_state(store, "daily") == ("paused", 1, "complaints")


async def test_the_watcher_picks_up_a_new_file_within_seconds(store, db_url, folder: Path):
    async with daemon_on(store, db_url) as daemon:
        watcher = PlanWatcher(daemon, folder, debounce_ms=100, settle_s=0.05)
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.sleep(0.3)  # the watch is set up
            # Written in two parts, like a slow copy: the first part alone is invalid.
            text = DAILY.format(at="09:00", count=30)
            with (folder / "daily.yaml").open("w") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                await asyncio.sleep(0.05)
                f.write(text[len(text) // 2 :])

            async def loaded() -> bool:
                return await store.plan("daily") is not None

            async def paused() -> bool:
                return (await plan_state(store, "daily"))[0] == "paused"

            await eventually(loaded, what="the new file scheduled")
            (folder / "daily.yaml").unlink()
            await eventually(paused, what="the plan paused after its file was removed")
            watcher.request_rescan()  # SIGHUP / reload path
        finally:
            watcher.stop()
            await asyncio.wait_for(task, 10)


# --- bad input is contained (issue 9): one file's problem never stops the others --------------


def hostile_files(folder: Path) -> dict[str, str]:
    """One file of each kind that used to stop the whole rescan, and a phrase of its problem."""
    os.mkfifo(folder / "fifo.yaml")
    (folder / "loop.yaml").symlink_to(folder / "loop.yaml")
    (folder / "zero.yaml").symlink_to("/dev/zero")
    (folder / "dir.yaml").mkdir()
    (folder / "big.yaml").write_text("#" * (limits.MAX_FILE_BYTES + 1))
    (folder / "feb30.yaml").write_text(
        DAILY.format(at="09:00", count=30)
        .replace("id: daily", "id: feb30")
        .replace("2026-03-01", "2026-02-30")
    )
    (folder / "deep.yaml").write_text("name: " + "[" * 1000 + "]" * 1000)
    (folder / "huge-count.yaml").write_text(
        DAILY.format(at="09:00", count=10**9).replace("id: daily", "id: huge-count")
    )
    return {
        "fifo.yaml": "named pipe",
        "loop.yaml": "symbolic link",
        "zero.yaml": "character device",
        "dir.yaml": "a folder",
        "big.yaml": "over the limit",
        "feb30.yaml": "day is out of range for month",
        "deep.yaml": "nested more than",
        "huge-count.yaml": "less than or equal to 1000",
    }


async def test_bad_files_are_reported_and_the_others_keep_updating(
    store, db_url, folder: Path, caplog
):
    async with watching(store, db_url, folder) as (daemon, watcher, file):
        expected = hostile_files(folder)
        file.write_text(DAILY.format(at="08:00", count=30))  # an edit, made meanwhile
        with caplog.at_level(logging.ERROR, logger="scheduler.app.watcher"):
            started = time.monotonic()
            report = await watcher.rescan(why="file change")
            assert time.monotonic() - started < 10
        assert report.synced.added == ["daily"]
        assert await plan_state(store, "daily") == ("active", 2, None)
        # every problem is recorded (status and the API show plan_problems) and logged
        rows = await store.pool.fetch("SELECT source_file, problems FROM plan_problems")
        recorded = {Path(r["source_file"]).name: r["problems"] for r in rows}
        assert set(recorded) == set(expected)
        for name, phrase in expected.items():
            assert any(phrase in p["reason"] for p in recorded[name]), (name, recorded[name])
            assert any(name in r.getMessage() for r in caplog.records), name
        report = await overview(store, now=daemon.clock())
        shown = render_overview(report)
        for name in expected:
            assert str(folder / name) in shown


async def test_a_second_file_cannot_take_over_a_running_plan(store, db_url, folder: Path):
    async with watching(store, db_url, folder, "z-daily.yaml") as (_, watcher, owner):
        # a new file with the same id, first in alphabetical order
        claimant = folder / "a-copy.yaml"
        claimant.write_text(DAILY.format(at="07:00", count=30))
        report = await watcher.rescan()
        assert report.synced.added == []
        assert await plan_state(store, "daily") == ("active", 1, None)
        source = await store.pool.fetchval("SELECT source_file FROM plan_versions")
        assert source == str(owner)
        problem = await store.pool.fetchrow("SELECT source_file, problems FROM plan_problems")
        assert problem["source_file"] == str(claimant)
        [reason] = [p["reason"] for p in problem["problems"]]
        assert str(owner) in reason and "'daily'" in reason
        # still the owner while its own file is broken: the last good version keeps running
        owner.write_text("name: [\n")
        await watcher.rescan()
        assert await plan_state(store, "daily") == ("active", 1, None)
        files = {r["source_file"] for r in await store.pool.fetch("SELECT * FROM plan_problems")}
        assert files == {str(owner), str(claimant)}
        # the owner's file removed for good: the id is free for the other file (a rename)
        owner.unlink()
        await watcher.rescan()
        assert await plan_state(store, "daily") == ("active", 2, None)
        assert await store.pool.fetchval("SELECT count(*) FROM plan_problems") == 0


async def test_problems_postgresql_cannot_store_as_text_are_still_recorded(
    store, db_url, folder: Path
):
    """A NUL in a field path (from a "\\0" escape in a key) or a file name that is not UTF-8
    would make PostgreSQL refuse the problem row, and the rescan with it."""
    async with watching(store, db_url, folder) as (daemon, watcher, file):
        nul = DAILY.format(at="09:00", count=30).replace('{thing1: "Day', '{"thi\\0ng1": "Day')
        (folder / "nul.yaml").write_text(nul.replace("id: daily", "id: nul"))
        odd = folder / os.fsdecode(b"latin-\xe9t\xe9.yaml")  # Latin-1, not UTF-8
        odd.write_text(DAILY.format(at="09:00", count=30).replace("daily", "odd"))
        file.write_text(DAILY.format(at="08:00", count=30))
        await watcher.rescan()
        assert await plan_state(store, "daily") == ("active", 2, None)
        rows = await store.pool.fetch("SELECT source_file, problems FROM plan_problems")
        assert len(rows) == 2, rows
        text = " ".join(p["field"] + p["reason"] for r in rows for p in r["problems"])
        assert "NUL" in text and "UTF-8" in text and "\x00" not in text


async def test_a_file_turned_into_a_symlink_loop_is_broken_not_removed(store, db_url, folder: Path):
    async with watching(store, db_url, folder) as (daemon, watcher, file):
        file.unlink()
        file.symlink_to(file)
        report = await watcher.rescan()
        assert report.paused == []
        assert await plan_state(store, "daily") == ("active", 1, None)
        [reason] = [p.reason for p in report.problems]
        assert "symbolic link" in reason
