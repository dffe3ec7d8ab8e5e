"""Commands between processes, through PostgreSQL: every replica LISTENs on one channel.

`reminders reload` and the CLI's plan actions run in their own short-lived process with no
APScheduler and no channel; they change the database and NOTIFY `reminders_control` (inside
their transaction, so the notification means "committed"). Each daemon replica hears it:

    {"kind": "reload"}                    rescan the plans folder (like SIGHUP, on every replica)
    {"kind": "catch_up", "plan": ID}      fan out the occurrences a resume queued (one replica
                                          takes each; the others skip its locked row)
    {"kind": "state", "plan": ID, ...}    a plan changed state: drop the schedule of a plan that
                                          is over; a resumed plan's chunks are taken again
    {"kind": "work"}                      an occurrence was recorded: every replica takes chunks

Notifications are a wake-up, never the only path: the loop also polls every `poll_s`, so a
replica that was reconnecting still picks up queued catch-ups.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from scheduler.app.lifecycle import process_catch_up

if TYPE_CHECKING:
    from scheduler.app.daemon import Daemon
    from scheduler.app.watcher import PlanWatcher
    from scheduler.store.abc import ListeningConnection

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, daemon: Daemon, watcher: PlanWatcher, *, poll_s: float = 5.0):
        self.daemon = daemon
        self.watcher = watcher
        self.poll_s = poll_s
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _heard(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = {"kind": payload}
        self._inbox.put_nowait(message if isinstance(message, dict) else {"kind": str(message)})

    async def run(self) -> None:
        """Listen (reconnecting when the connection drops) and act, until cancelled."""
        while True:
            try:
                async with self.daemon.store.control.listen(self._heard) as listening:
                    await self._serve(listening)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("control channel: %s; reconnecting in %.0f s", exc, self.poll_s)
                await asyncio.sleep(self.poll_s)

    async def _serve(self, listening: ListeningConnection) -> None:
        await self.catch_up()  # whatever was queued while no replica was listening
        while True:
            try:
                message = await asyncio.wait_for(self._inbox.get(), self.poll_s)
            except TimeoutError:
                await listening.ping()  # a dead connection raises here: reconnect
                await self.catch_up()
                continue
            await self.handle(message)

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "reload":
            log.info("reload requested: rescanning %s", self.watcher.plans_dir)
            self.watcher.request_rescan("reload command")
        elif kind == "catch_up":
            await self.catch_up()
        elif kind == "work" or (kind == "state" and message.get("state") == "active"):
            self.daemon.work_available.set()
        elif kind == "state" and message.get("state") in ("cancelled", "completed"):
            try:
                await self.daemon._remove_schedule(str(message.get("plan")))
            except Exception as exc:  # the next state change or restart tries again
                log.warning("could not remove the schedule of %s: %s", message.get("plan"), exc)

    async def catch_up(self) -> None:
        try:
            handled = await process_catch_up(
                self.daemon.store, self.daemon.dispatcher, clock=self.daemon.clock
            )
        except Exception:
            log.exception("catching up failed; retrying in %.0f s", self.poll_s)
            return
        if handled:
            log.info("caught up %d occurrence(s)", handled)
