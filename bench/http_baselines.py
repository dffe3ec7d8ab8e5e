"""HTTP baselines: how fast WeChatChannel.send is against the fake, next to a bare aiohttp loop.

    python -m bench.http_baselines [--n 5000] [--concurrency 256]

starts the fake WeChat in a subprocess (pinned to another core than this process where the
machine has two), posts N messages through the channel and then N raw requests with the same
JSON bodies, and prints `channel_per_s=... raw_per_s=... channel_cpu_us=... raw_cpu_us=...
pinned=0|1` (this process's CPU microseconds per send in each loop; pinned=0 when it sees fewer
than two cores, with a warning). Loopback only, bounded in time.
`channel_loop` and `aiohttp_loop` are importable for the fan-out benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

from scheduler.channels.base import OutgoingMessage
from scheduler.channels.wechat import WeChatChannel, send_body
from scheduler.domain.outcomes import Outcome
from scheduler.settings import SEND_CONCURRENCY

logger = logging.getLogger(__name__)

TIME_LIMIT_S = 300.0


async def _pool(jobs: int, concurrency: int, job: Callable[[int], Awaitable[bool]]) -> float:
    """Run job(0..jobs-1) on `concurrency` workers; the rate of jobs per second."""
    indexes = iter(range(jobs))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for index in indexes:  # a shared iterator: each index goes to one worker
            if not await job(index):
                failures += 1

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, jobs)):
            group.create_task(worker())
    elapsed = time.perf_counter() - started
    if failures:
        logger.warning("%d of %d sends did not succeed", failures, jobs)
    return jobs / elapsed


async def channel_loop(
    channel: WeChatChannel, messages: Sequence[OutgoingMessage], concurrency: int
) -> float:
    """Sends per second posting `messages` through `channel.send`, `concurrency` at a time."""

    async def job(index: int) -> bool:
        return (await channel.send(messages[index])).outcome is Outcome.SENT

    return await _pool(len(messages), concurrency, job)


async def aiohttp_loop(
    base_url: str,
    token: str,
    messages: Sequence[OutgoingMessage],
    concurrency: int,
    *,
    miniprogram_state: str = "formal",
    lang: str = "zh_CN",
) -> float:
    """Requests per second posting the channel's JSON bodies with a bare aiohttp session."""
    url = f"{base_url.rstrip('/')}/cgi-bin/message/subscribe/send"
    params = {"access_token": token}
    headers = {"Content-Type": "application/json"}
    # Bodies are encoded up front: this is the floor that HTTP itself costs.
    bodies = [
        json.dumps(
            send_body(m, miniprogram_state=miniprogram_state, lang=lang),
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        for m in messages
    ]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def job(index: int) -> bool:
            async with session.post(url, params=params, data=bodies[index], headers=headers) as r:
                answer = json.loads(await r.read())
            return r.status == 200 and answer.get("errcode") == 0

        return await _pool(len(bodies), concurrency, job)


def _messages(n: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(
            touser=f"o-bench-user-{i:07d}",
            template_id="bench-template",
            data={"thing1": "康复训练提醒", "time2": "2025年3月1日 09:00", "number3": str(i)},
            page="pages/plan/index?step=1",
        )
        for i in range(n)
    ]


async def _start_fake() -> tuple[asyncio.subprocess.Process, str]:
    """The fake WeChat in its own process (no stored messages, to keep it lean) and its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scheduler.testing.fake_wechat",
        "--no-keep-messages",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    if not line:
        raise RuntimeError("the fake WeChat exited before it printed its URL")
    return process, line.decode().strip()


def _pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(pid, {cpu})


async def _fetch_token(base_url: str) -> str:
    payload = {"grant_type": "client_credential", "appid": "bench", "secret": "bench"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/cgi-bin/stable_token", json=payload) as response,
    ):
        return str((await response.json())["access_token"])


async def _main(n: int, concurrency: int) -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    process, base_url = await _start_fake()
    try:
        if len(cpus) >= 2:  # server and client each on a core of their own
            _pin(process.pid, cpus[1])
            _pin(0, cpus[0])
        else:
            print(f"WARNING: NOT PINNED: this process sees CPUs {cpus}", file=sys.stderr)
        messages = _messages(n)
        async with asyncio.timeout(TIME_LIMIT_S):
            channel = WeChatChannel(base_url, "bench", "bench", retries=1)
            try:
                await channel_loop(channel, messages[: min(n, 500)], concurrency)  # warm-up
                cpu = time.process_time()
                channel_per_s = await channel_loop(channel, messages, concurrency)
                channel_us = (time.process_time() - cpu) / n * 1e6
            finally:
                await channel.aclose()
            token = await _fetch_token(base_url)
            cpu = time.process_time()
            raw_per_s = await aiohttp_loop(base_url, token, messages, concurrency)
            raw_us = (time.process_time() - cpu) / n * 1e6
        print(
            f"channel_per_s={channel_per_s:.0f} raw_per_s={raw_per_s:.0f} "
            f"channel_cpu_us={channel_us:.0f} raw_cpu_us={raw_us:.0f} pinned={int(len(cpus) >= 2)}"
        )
    finally:
        process.terminate()
        await process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="messages per loop")
    parser.add_argument("--concurrency", type=int, default=SEND_CONCURRENCY)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_main(args.n, args.concurrency))


if __name__ == "__main__":
    main()
