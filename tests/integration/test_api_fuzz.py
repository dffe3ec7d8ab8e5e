"""Fuzzing in the suite (bench/fuzz_api.py runs the same generators for much longer): schemathesis
requests from the served OpenAPI document with admin and ingest tokens, and mutated pushes at the
callback, against the real app on loopback over a real PostgreSQL. No 5xx, no server-side
traceback, no hang, and every API answer is one the document allows."""

from __future__ import annotations

import asyncio

from bench.fuzz_api import Tally, fuzz_api, fuzz_pushes, served
from scheduler.store.postgres import Store


async def test_fuzzed_requests_and_pushes_get_no_5xx_and_answers_the_document_allows(store: Store):
    tally = Tally()
    async with served(store, tally) as base_url:
        await asyncio.to_thread(fuzz_api, base_url, 300, tally, hang_s=10)
        await asyncio.to_thread(fuzz_pushes, base_url, 80, tally, hang_s=10)
    assert tally.cases >= 300
    counts = (tally.tracebacks, tally.server_errors, tally.hangs, tally.nonconforming)
    assert counts == (0, 0, 0, 0), "\n".join(tally.samples)
