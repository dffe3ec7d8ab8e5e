"""The flight recorder: no send leaves before the database knows it may be on the wire.

Each send of a replica passes here twice. Before the channel gets it, `authorize` waits until its
delivery id is written into the replica's `in_flight` (and the row is still pending and ours:
a recovery may have given it back to the pool); after, `finished` hands over its result, which
is written in the same kind of round trip. One loop writes everything that accumulated since its
last round trip (group commit), so the cost per send is a share of one small transaction.

A slot is taken at `authorize` and given back when the result is handed over. Every round trip
writes all results handed over so far together with the authorisations it grants, so the
replica's recorded `in_flight` never holds more than `slots` sends: that is what a crash can turn
into `unknown` (everything else claimed goes back to the pool, see recover_replica_v1).

Under a send `rate` (REMINDERS_SEND_RATE), an authorisation also takes a token from the app's
bucket in PostgreSQL, shared by every replica (record_flight_v2); candidates it cannot cover yet
wait for a later round trip, holding their slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from scheduler.store.postgres import FanOutStore, Finished, SendRate, retry_transient

log = logging.getLogger(__name__)


class FlightRecorder:
    def __init__(
        self,
        store: FanOutStore,
        replica: str,
        slots: int,
        *,
        linger_s: float = 0.008,
        rate: SendRate | None = None,
    ):
        self._store = store
        # Under a send rate, candidates the app's bucket could not cover ask again after this.
        self._rate = rate
        self._rate_wait_s = min(max(1 / rate.per_second, 0.01), 0.1) if rate else 0.0
        self._waiting = False
        # A round trip costs this process ~100 us of CPU whatever it carries: wait a moment for
        # more to carry, until a quarter of the slots' worth is waiting (then at once).
        self._linger_s = linger_s
        self._enough = max(slots // 4, 1)
        self._enough_waiting = asyncio.Event()
        self._replica = replica
        self._slots = asyncio.Semaphore(slots)
        self._in_flight: set[int] = set()  # authorized, result not written yet
        self._candidates: dict[int, asyncio.Future[bool]] = {}
        self._results: list[tuple[str, str, Finished, bool]] = []
        self._handed = 0  # results handed over so far
        self._written = 0  # of which written
        self._flushed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def authorize(self, delivery_id: int) -> bool:
        """Wait for a slot and for the row to be recorded in flight. False: the row is no longer
        this replica's (do not send it)."""
        await self._slots.acquire()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._candidates[delivery_id] = future
        self._kick()
        try:
            allowed = await future
        except BaseException:
            self._slots.release()
            raise
        if not allowed:
            self._slots.release()
        return allowed

    def finished(
        self, template_id: str, consent_kind: str, result: Finished, *, sent: bool
    ) -> None:
        """Hand over a result (`sent`: it was authorized and went to the channel, and its slot
        is free now); it is written with the next round trip."""
        self._results.append((template_id, consent_kind, result, sent))
        self._handed += 1
        if sent:  # its next round trip writes it with whatever this slot authorizes next
            self._slots.release()
        self._kick()

    async def flush(self) -> None:
        """Wait until every result handed over so far is written."""
        target = self._handed
        async with self._flushed:
            await self._flushed.wait_for(lambda: self._written >= target)

    def _kick(self) -> None:
        if len(self._candidates) + len(self._results) >= self._enough:
            self._enough_waiting.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Round trips until nothing is left, on one connection held meanwhile (a pool checkout
        per round trip would cost as much as the round trip); through an outage, tenacity waits
        and a fresh connection is taken."""
        while self._candidates or self._results:
            try:
                async for attempt in retry_transient(what="recording the sends in flight"):
                    with attempt:
                        async with self._store.held_connection() as conn:
                            while self._candidates or self._results:
                                await self._round_trip(conn)
            except Exception:  # not an outage: a fault worth a traceback; try again soon
                log.exception("recording the sends in flight failed; retrying in 1 s")
                await asyncio.sleep(1)

    async def _round_trip(self, conn: Any) -> None:
        if self._waiting:
            await asyncio.sleep(self._rate_wait_s)
        elif len(self._candidates) + len(self._results) < self._enough:
            # Not a fixed sleep: a send waits for its authorisation for as long as this lasts.
            self._enough_waiting.clear()
            timer = asyncio.get_running_loop().call_later(self._linger_s, self._enough_waiting.set)
            await self._enough_waiting.wait()
            timer.cancel()
        candidates, self._candidates = self._candidates, {}
        results, self._results = self._results, []
        done = {r.delivery_id for _, _, r, sent in results if sent}
        still = self._in_flight - done
        try:
            authorized, waiting = await self._store.record_flight(
                self._replica,
                sorted(still),
                sorted(candidates),
                [(t, k, r) for t, k, r, _ in results],
                conn=conn,
                rate=self._rate,
            )
        except BaseException:  # nothing was written: all of it goes with the next try
            self._candidates = {**candidates, **self._candidates}
            self._results = results + self._results
            raise
        self._in_flight = still | authorized
        self._waiting = bool(waiting)
        for delivery_id, future in candidates.items():
            if delivery_id in waiting:
                self._candidates[delivery_id] = future  # the bucket is empty: next round trip
            elif not future.done():
                future.set_result(delivery_id in authorized)
        self._written += len(results)
        async with self._flushed:
            self._flushed.notify_all()
