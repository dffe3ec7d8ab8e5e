"""Shared by the operations tests: a fake WeChat and a channel to it (fixtures), sample plans."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.crash_trials import PERMISSIVE_POLICY
from scheduler.channels.wechat import WeChatChannel
from scheduler.testing.fake_wechat import FakeWeChat


@pytest.fixture(name="fake")
async def fake_fixture() -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat()
    await fake.start("127.0.0.1", 0)
    yield fake
    await fake.stop()


@pytest.fixture(name="fake")
async def consent_checking_fake_fixture() -> AsyncIterator[FakeWeChat]:
    """A fake WeChat that refuses sends without consent (43101), as the real one does."""
    fake = FakeWeChat(check_consent=True)
    await fake.start("127.0.0.1", 0)
    yield fake
    await fake.stop()


@pytest.fixture(name="channel")
async def channel_fixture(fake: FakeWeChat) -> AsyncIterator[WeChatChannel]:
    channel = WeChatChannel(
        base_url=fake.base_url, appid="app", secret="secret", retries=1, backoff_base=0.01
    )
    yield channel
    await channel.aclose()


async def eventually(check, within_s: float = 10.0, what: str = "condition") -> None:  # noqa: ANN001
    """Poll the async predicate `check` until it is true; fail after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(name="fake_url")
def fake_url_fixture() -> Iterator[str]:
    """A fake WeChat in its own process on loopback; yields its base URL."""
    with subprocess.Popen(
        [sys.executable, "-m", "scheduler.testing.fake_wechat", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:"), url
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


# Plans that fire every few seconds break every cap and quiet hour of the default policy: a test
# folder that runs one holds this policy (the rules themselves are tested in their own files).


def permissive_policy_in(folder: Path) -> Path:
    (folder / "policy.yaml").write_text(PERMISSIVE_POLICY)
    return folder
