"""The plans folder, kept live: adds, edits, broken edits and deletions while the daemon runs.

`watchfiles` (inotify on Linux, a Rust watcher; `force_polling` for network mounts) reports
changes; after a quiet period and once the changed files stop growing, the whole folder is
rescanned (a handful of small files, and it makes renames, editors' atomic saves and Kubernetes
ConfigMap symlink swaps just work). A rescan:

- registers every valid plan through `Daemon.sync_plans`: a new plan is scheduled, an edit becomes
  a new version for future occurrences, a changed schedule is re-added from now (no past fire);
- loads the folder's `policy.yaml` for the gate (an invalid one is reported and the last good
  policy stays in force) and rejects plans that break it statically, as `reminders validate` does;
- records each invalid file's problems in `plan_problems` (status and the API show them) and logs
  them once per change; the plan's last good version keeps running. A half-written file is simply
  invalid until the write completes and the next change event rescans it. Each file is checked,
  and each plan scheduled, on its own: one file's problem never keeps another plan from updating;
- keeps each plan id with the file its running plan came from: another file defining the same id
  is rejected (naming both files) until that file is gone;
- pauses a plan whose file is gone (reason "file removed"; an admin cancels it explicitly) and
  resumes it, skipping what it missed, when the file comes back.

SIGHUP and `reminders reload` (a NOTIFY every replica hears) force a rescan.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from watchfiles import awatch

from scheduler.app.lifecycle import FILE_REMOVED, FILE_RESTORED, LifecycleError
from scheduler.domain.policy import PlanException, Policy
from scheduler.errors import PlanError, PlanProblem
from scheduler.planfiles import LoadedPlan, check_plans, load_policy

if TYPE_CHECKING:
    from scheduler.app.daemon import Daemon, SyncResult

log = logging.getLogger(__name__)

ACTOR = "plan-file"


@dataclass
class ScanReport:
    loaded: list[LoadedPlan]
    problems: list[PlanProblem]
    synced: SyncResult | None = None
    paused: list[str] = field(default_factory=list)  # file removed
    resumed: list[str] = field(default_factory=list)  # file restored


def _text(text: str) -> str:
    # PostgreSQL text holds neither NUL nor the lone surrogates of a file name that is not UTF-8
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _storable(problem: PlanProblem) -> PlanProblem:
    return PlanProblem(_text(problem.file), _text(problem.field), _text(problem.reason))


def _in_folder(source: str | None, folder: Path) -> bool:
    return bool(source) and Path(str(source)).parent == folder


class PlanWatcher:
    def __init__(
        self,
        daemon: Daemon,
        plans_dir: Path,
        *,
        debounce_ms: int = 300,
        settle_s: float = 0.2,
        force_polling: bool = False,
    ):
        self.daemon = daemon
        self.plans_dir = Path(plans_dir)
        self.debounce_ms = debounce_ms
        self.settle_s = settle_s
        self.force_polling = force_polling
        self._wanted = asyncio.Event()
        self._why: set[str] = set()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._extra: list[LoadedPlan] = []  # plans not from files (the demo plan)
        self._extra_exceptions: dict[str, PlanException] = {}  # the demo plan's limits
        self._logged: dict[str, list[str]] = {}  # file -> problems already logged
        self.scans = 0

    # --- running --------------------------------------------------------------------------------

    def request_rescan(self, why: str = "requested") -> None:
        """Ask for a rescan soon (file changes, SIGHUP and `reminders reload` call this)."""
        self._why.add(why)
        self._wanted.set()

    async def run(self) -> None:
        """Watch the folder and rescan on changes and requests, until `stop()`."""
        watching = asyncio.create_task(self._watch())
        try:
            while not self._stop.is_set():
                wanted = asyncio.create_task(self._wanted.wait())
                stopping = asyncio.create_task(self._stop.wait())
                await asyncio.wait({wanted, stopping}, return_when=asyncio.FIRST_COMPLETED)
                wanted.cancel()
                stopping.cancel()
                if self._stop.is_set():
                    break
                self._wanted.clear()
                why, self._why = ", ".join(sorted(self._why)), set()
                try:
                    await self.rescan(why=why)
                except Exception:  # a rescan must never take the daemon down
                    log.exception("rescanning %s failed; the next change retries", self.plans_dir)
        finally:
            self._stop.set()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    def stop(self) -> None:
        self._stop.set()

    async def _watch(self) -> None:
        if not self.plans_dir.is_dir():
            log.warning("plans folder %s does not exist: not watching it", self.plans_dir)
            return
        # A file written between the start-up scan and the watch being set up would go unseen
        # until its next change: rescan once the watch is surely in place.
        asyncio.get_running_loop().call_later(1.0, self.request_rescan, "watch started")
        async for changes in awatch(
            self.plans_dir,
            debounce=max(self.debounce_ms * 4, 400),
            step=self.debounce_ms,
            stop_event=self._stop,
            force_polling=self.force_polling or None,
            recursive=False,
        ):
            log.debug("plans folder changed: %s", sorted(p for _, p in changes))
            await self._settle([Path(p) for _, p in changes])
            self.request_rescan("file change")

    async def _settle(self, paths: Sequence[Path], limit_s: float = 3.0) -> None:
        """Wait until the changed files stop changing (a writer still at work), up to limit_s."""

        def snapshot() -> list[tuple[int, int] | None]:
            out: list[tuple[int, int] | None] = []
            for p in paths:
                try:
                    st = os.stat(p)
                except OSError:
                    out.append(None)
                else:
                    out.append((st.st_size, st.st_mtime_ns))
            return out

        before = snapshot()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            await asyncio.sleep(self.settle_s)
            now = snapshot()
            if now == before:
                return
            before = now

    # --- one rescan -----------------------------------------------------------------------------

    async def rescan(
        self,
        extra: Sequence[LoadedPlan] | None = None,
        *,
        why: str = "start-up",
        extra_exceptions: dict[str, PlanException] | None = None,
    ) -> ScanReport:
        """Load the folder and bring the database and the schedules in line with it."""
        async with self._lock:
            if extra is not None:
                self._extra = list(extra)
            if extra_exceptions is not None:
                self._extra_exceptions = dict(extra_exceptions)
            owners = await self._owners()
            checked = await asyncio.to_thread(
                check_plans, [self.plans_dir], self.daemon.clock(), None, owners
            )
            problems = checked.problems
            await asyncio.to_thread(self._load_policy)
            report = ScanReport([], problems)
            report.synced = await self._sync(checked.plans + self._extra, report)
            loaded = report.loaded
            await self._record_problems(problems)
            await self._reconcile(loaded, report)
            self.scans += 1
            if self.scans > 1:
                log.info(
                    "plans folder rescanned (%s): %d (re)scheduled, %d paused (file removed), "
                    "%d resumed (file restored), %d invalid file(s)",
                    why,
                    len(report.synced.added),
                    len(report.paused),
                    len(report.resumed),
                    len({p.file for p in problems}),
                )
            return report

    async def _owners(self) -> dict[str, str]:
        """Plan id -> the file its running version came from, which keeps the id."""
        return await self.daemon.store.plan_files.owners()

    async def _sync(self, plans: list[LoadedPlan], report: ScanReport) -> SyncResult:
        """Schedule each plan on its own: one that cannot be scheduled is its file's problem."""
        from scheduler.app.daemon import SyncResult

        synced = SyncResult([], [], [])
        for item in plans:
            try:
                one = await self.daemon.sync_plans([item])
            except Exception as exc:  # the other plans still update
                log.exception("plan %s could not be scheduled", item.plan.id)
                reason = f"could not be scheduled ({type(exc).__name__}: {exc})"
                report.problems.append(PlanProblem(str(item.path), "", reason))
                continue
            report.loaded.append(item)
            synced.added += one.added
            synced.unchanged += one.unchanged
            synced.finished += one.finished
        return synced

    def _load_policy(self) -> None:
        """The gate's policy from the folder (its problems are among the scan's problems)."""
        try:
            policy = load_policy(self.plans_dir)
        except PlanError:
            log.error("the policy file is invalid: the last good policy stays in force")
            return
        if self._extra_exceptions:
            exceptions = {**policy.exceptions, **self._extra_exceptions}
            policy = Policy.model_validate({**policy.model_dump(), "exceptions": exceptions})
        self.daemon.dispatcher.policy = policy

    async def _record_problems(self, problems: list[PlanProblem]) -> None:
        files = self.daemon.store.plan_files
        by_file: dict[str, list[PlanProblem]] = {}
        for problem in map(_storable, problems):
            by_file.setdefault(problem.file, []).append(problem)
        for file, found in by_file.items():
            body = [{"field": p.field, "reason": p.reason} for p in found]
            plan_id = await files.plan_of_file(file)
            previous = await files.record_problems(file, plan_id, body)
            text = [str(p) for p in found]
            if previous != body:
                keeps = f"; plan {plan_id}'s last good version keeps running" if plan_id else ""
                log.error(
                    "plan file rejected: %s%s",
                    "; ".join(text),
                    keeps,
                    extra={"plan_id": plan_id, "file": file},
                )
                await self.daemon.lifecycle.record(
                    "file_rejected",
                    actor=ACTOR,
                    plan_id=plan_id,
                    reason=text[0] if len(text) == 1 else f"{text[0]} (+{len(text) - 1} more)",
                    details={"file": file, "problems": body},
                )
            elif self._logged.get(file) != text:
                log.error("plan file rejected: %s", "; ".join(text), extra={"file": file})
            self._logged[file] = text
        # Files that validate again, or are gone, have no problem left.
        for file in await files.files_with_problems():
            if file not in by_file and _in_folder(file, self.plans_dir):
                await files.clear_problems(file)
                self._logged.pop(file, None)

    async def _reconcile(self, loaded: list[LoadedPlan], report: ScanReport) -> None:
        present = {item.plan.id for item in loaded}
        rows = await self.daemon.store.plan_files.current_versions()
        lifecycle = self.daemon.lifecycle
        for row in rows:
            plan_id, source = row["id"], row["source_file"]
            try:
                if (
                    row["state"] == "active"
                    and plan_id not in present
                    and _in_folder(source, self.plans_dir)
                    # lexists: a file turned into a broken link is broken, not removed
                    and not os.path.lexists(source)  # noqa: ASYNC240 - one stat, local disk
                ):
                    await lifecycle.pause(plan_id, actor=ACTOR, reason=FILE_REMOVED)
                    log.warning(
                        "plan %s paused: its file %s was removed (resume or cancel it; "
                        "restoring the file resumes it)",
                        plan_id,
                        source,
                        extra={"plan_id": plan_id},
                    )
                    report.paused.append(plan_id)
                elif (
                    row["state"] == "paused"
                    and row["state_reason"] == FILE_REMOVED
                    and plan_id in present
                ):
                    await lifecycle.resume(plan_id, actor=ACTOR, reason=FILE_RESTORED)
                    log.warning(
                        "plan %s resumed: its file is back", plan_id, extra={"plan_id": plan_id}
                    )
                    report.resumed.append(plan_id)
            except LifecycleError as exc:  # another replica acted first
                log.debug("plan %s: %s", plan_id, exc)
