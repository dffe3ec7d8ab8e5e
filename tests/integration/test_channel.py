"""WeChatChannel against a FakeWeChat on loopback: real HTTP, real aiohttp transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.channels.base import OutgoingMessage
from scheduler.channels.wechat import WeChatChannel, send_body
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.testing.fake_wechat import FakeWeChat

MESSAGE = OutgoingMessage(
    touser="o-user-1",
    template_id="tmpl-1",
    data={"thing1": "康复训练第3周", "time2": "2025年3月1日 09:00"},
    page="pages/plan/index?step=3",
)


def make_channel(base_url: str, **options: object) -> WeChatChannel:
    settings: dict[str, object] = {
        "timeout": 2.0,
        "retries": 3,
        "backoff_base": 0.001,
        "backoff_max": 0.005,
    }
    settings.update(options)
    return WeChatChannel(base_url, "wx-test", "s3cret", **settings)  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def channel(fake: FakeWeChat) -> AsyncIterator[WeChatChannel]:
    assert fake.base_url is not None
    channel = make_channel(fake.base_url)
    yield channel
    await channel.aclose()


def token_calls(fake: FakeWeChat) -> int:
    return int(fake.stats()["token_calls"].get("stable_token", 0))


def test_send_body_matches_the_api() -> None:
    body = send_body(MESSAGE, miniprogram_state="formal", lang="zh_CN")
    assert body == {
        "touser": "o-user-1",
        "template_id": "tmpl-1",
        "page": "pages/plan/index?step=3",
        "data": {"thing1": {"value": "康复训练第3周"}, "time2": {"value": "2025年3月1日 09:00"}},
        "miniprogram_state": "formal",
        "lang": "zh_CN",
    }
    no_page = OutgoingMessage(touser="o", template_id="t", data={"thing1": "x"})
    assert "page" not in send_body(no_page, miniprogram_state="formal", lang="zh_CN")


TEXT = st.text(max_size=12)  # any code point: quotes, controls, surrogates, CJK


@settings(max_examples=300, deadline=None)
@given(
    sends=st.lists(
        st.tuples(TEXT, st.sampled_from(["t1", 't"2']), st.dictionaries(TEXT, TEXT, max_size=4)),
        min_size=1,
        max_size=6,
    ),
    pages=st.lists(st.none() | TEXT, min_size=6, max_size=6),
    state=st.sampled_from(["formal", "trial"]),
)
def test_the_encoded_body_is_the_whole_body_encoded(
    sends: list[tuple[str, str, dict[str, str]]], pages: list[str | None], state: str
) -> None:
    # The channel encodes the part of a body that users share once (per template and data):
    # the bytes it posts must be those of encoding send_body whole, for every message, also
    # when a remembered part is reused for another user and page.
    import json

    channel = WeChatChannel("http://127.0.0.1:9", "wx", "s", miniprogram_state=state)
    for (user, template, data), page in zip(sends + sends, pages + pages, strict=False):
        message = OutgoingMessage(user, template, data, page)
        whole = send_body(message, miniprogram_state=state, lang="zh_CN")
        text = json.dumps(whole, ensure_ascii=False, separators=(",", ":"))
        try:
            expected = text.encode()
        except UnicodeEncodeError:  # a lone surrogate cannot be sent: both refuse it
            with pytest.raises(UnicodeEncodeError):
                channel._content(message)
            continue
        assert channel._content(message) == expected


async def test_success_returns_the_msgid(fake: FakeWeChat, channel: WeChatChannel) -> None:
    result = await channel.send(MESSAGE)
    assert result.outcome is Outcome.SENT
    assert result.errcode == 0
    [message] = fake.messages
    assert result.msgid == message["msgid"]
    assert message["data"] == dict(MESSAGE.data)
    assert message["page"] == MESSAGE.page
    assert (message["miniprogram_state"], message["lang"]) == ("formal", "zh_CN")


async def test_state_and_lang_are_sent(fake: FakeWeChat) -> None:
    assert fake.base_url is not None
    channel = make_channel(fake.base_url, miniprogram_state="developer", lang="en_US")
    try:
        assert (await channel.send(MESSAGE)).outcome is Outcome.SENT
    finally:
        await channel.aclose()
    assert (fake.messages[0]["miniprogram_state"], fake.messages[0]["lang"]) == (
        "developer",
        "en_US",
    )


async def test_consent_gone(fake: FakeWeChat, channel: WeChatChannel) -> None:
    fake.check_consent = True
    result = await channel.send(MESSAGE)
    assert result.outcome is Outcome.FAILED
    assert result.reason is Reason.CONSENT_GONE
    assert result.errcode == 43101
    assert result.detail is not None and " rid: " in result.detail
    assert fake.stats()["sends"] == 1  # not retried


async def test_expired_token_is_renewed_once(fake: FakeWeChat, channel: WeChatChannel) -> None:
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT
    assert token_calls(fake) == 1
    fake.expire_tokens()
    result = await channel.send(MESSAGE)
    assert result.outcome is Outcome.SENT
    assert token_calls(fake) == 2
    assert fake.stats()["errcodes"] == {"0": 2, "42001": 1}


async def test_token_still_invalid_after_refresh_is_token_failure(
    fake: FakeWeChat, channel: WeChatChannel
) -> None:
    fake.inject([40001, 40001])
    result = await channel.send(MESSAGE)
    assert (result.outcome, result.reason, result.errcode) == (Outcome.FAILED, Reason.TOKEN, 40001)
    assert token_calls(fake) == 2
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT


async def test_a_refreshed_token_refused_again_is_not_replaced_until_one_passes(
    fake: FakeWeChat, channel: WeChatChannel
) -> None:
    # Token failures are the app's, not each send's: once the token fetched after a refusal is
    # refused too, further refusals of it cost no stable_token call.
    fake.inject([40001], times=5)
    for _ in range(4):  # the first with the first token and a fresh one, the others at once
        assert (await channel.send(MESSAGE)).reason is Reason.TOKEN
    assert token_calls(fake) == 2 and fake.stats()["errcodes"] == {"40001": 5}
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT  # the fresh token passes
    fake.inject([40001])  # so a later refusal is a token gone stale again: refreshed once
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT
    assert token_calls(fake) == 3


async def test_sends_waiting_on_a_failing_token_fetch_share_its_failure(
    fake: FakeWeChat,
) -> None:
    # WeChat's token endpoint is busy (-1, slowly): the eight sends that need a token wait for
    # the one fetch under way and take its failure, instead of each trying again in turn.
    assert fake.base_url is not None
    channel = make_channel(fake.base_url, retries=1)
    fake.inject_token_errors(-1, latency_s=0.3, times=8)
    results = await asyncio.gather(*(channel.send(MESSAGE) for _ in range(8)))
    await channel.aclose()
    assert {(r.outcome, r.reason) for r in results} == {(Outcome.FAILED, Reason.TRANSIENT)}
    assert token_calls(fake) == 1 and fake.stats()["sends"] == 0


@pytest.mark.parametrize("errcode", [-1, 43108])
async def test_transient_errcode_then_success(
    fake: FakeWeChat, channel: WeChatChannel, errcode: int
) -> None:
    fake.inject([errcode])
    result = await channel.send(MESSAGE)
    assert result.outcome is Outcome.SENT
    assert fake.stats()["errcodes"] == {str(errcode): 1, "0": 1}


async def test_a_5xx_without_errcode_is_unknown_and_never_sent_again(
    fake: FakeWeChat, channel: WeChatChannel
) -> None:
    # A gateway's 503 may come after WeChat took the message: there is no idempotency key.
    fake.inject(http_status=503)
    result = await channel.send(MESSAGE)
    assert (result.outcome, result.reason) == (Outcome.UNKNOWN, Reason.SERVER_ERROR)
    assert fake.stats()["http_statuses"] == {"503": 1} and fake.stats()["sends"] == 1


async def test_a_throttled_request_is_retried(fake: FakeWeChat, channel: WeChatChannel) -> None:
    fake.inject(http_status=429)
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT
    assert fake.stats()["http_statuses"] == {"429": 1}


async def test_invalid_data_is_not_retried(fake: FakeWeChat, channel: WeChatChannel) -> None:
    message = OutgoingMessage(touser="o", template_id="t", data={"thing1": "x" * 21})
    result = await channel.send(message)
    assert (result.outcome, result.reason, result.errcode) == (
        Outcome.FAILED,
        Reason.INVALID_DATA,
        47003,
    )
    assert result.detail is not None and "data.thing1.value invalid" in result.detail
    assert fake.stats()["sends"] == 1


@pytest.mark.parametrize(
    ("errcode", "reason"),
    [
        (45009, Reason.QUOTA),
        (40003, Reason.BAD_OPENID),
        (40037, Reason.BAD_TEMPLATE),
        (41030, Reason.BAD_PAGE),
        (43107, Reason.TEMPLATE_BANNED),
        (45168, Reason.SENSITIVE_CONTENT),
        (47001, Reason.BAD_REQUEST),
        (41001, Reason.BAD_REQUEST),
        (48001, Reason.WECHAT_ERROR),
    ],
)
async def test_permanent_errcodes_map_to_reasons(
    fake: FakeWeChat, channel: WeChatChannel, errcode: int, reason: Reason
) -> None:
    fake.inject([errcode])
    result = await channel.send(MESSAGE)
    assert (result.outcome, result.reason, result.errcode) == (Outcome.FAILED, reason, errcode)
    assert fake.stats()["sends"] == 1


async def test_retries_exhausted_is_transient(fake: FakeWeChat, channel: WeChatChannel) -> None:
    fake.inject([-1], times=3)
    result = await channel.send(MESSAGE)
    assert (result.outcome, result.reason, result.errcode) == (
        Outcome.FAILED,
        Reason.TRANSIENT,
        -1,
    )
    assert fake.stats()["errcodes"] == {"-1": 3}

    fake.inject(http_status=429, times=3)
    result = await channel.send(MESSAGE)
    assert (result.outcome, result.reason, result.detail) == (
        Outcome.FAILED,
        Reason.TRANSIENT,
        "HTTP 429",
    )
    assert (await channel.send(MESSAGE)).outcome is Outcome.SENT


async def test_a_reply_that_times_out_or_is_lost_is_unknown_and_never_sent_again(
    fake: FakeWeChat,
) -> None:
    assert fake.base_url is not None
    channel = make_channel(fake.base_url, timeout=0.2, retries=3)
    try:
        assert (await channel.send(MESSAGE)).outcome is Outcome.SENT  # the token, first
        # WeChat accepts the message, and its reply comes too late...
        fake.inject_lost_replies(reply="delay", latency_s=0.5)
        late = await channel.send(MESSAGE)
        # ... or never: the connection breaks after the request was written.
        fake.inject_lost_replies(reply="drop")
        dropped = await channel.send(MESSAGE)
    finally:
        await channel.aclose()
    await asyncio.sleep(0.6)  # let the fake finish the slow request it still holds
    assert (late.outcome, late.reason) == (Outcome.UNKNOWN, Reason.REPLY_TIMEOUT)
    assert late.detail is not None and "Timeout" in late.detail
    assert (dropped.outcome, dropped.reason) == (Outcome.UNKNOWN, Reason.REPLY_LOST)
    # Each message reached the user once: neither was sent again.
    assert len(fake.messages) == 3 and fake.replies_lost == 2


async def test_connection_refused_is_transient() -> None:
    fake = FakeWeChat()
    base_url = await fake.start()
    await fake.stop()  # nothing listens there now
    channel = make_channel(base_url)
    try:
        result = await channel.send(MESSAGE)
    finally:
        await channel.aclose()
    assert (result.outcome, result.reason) == (Outcome.FAILED, Reason.TRANSIENT)
    assert result.detail


async def test_bad_secret_is_a_token_failure_fetched_once(fake: FakeWeChat) -> None:
    fake.secret = "the-real-one"
    assert fake.base_url is not None
    channel = make_channel(fake.base_url)
    try:
        results = await asyncio.gather(*(channel.send(MESSAGE) for _ in range(50)))
    finally:
        await channel.aclose()
    assert {(r.outcome, r.reason, r.errcode) for r in results} == {
        (Outcome.FAILED, Reason.TOKEN, 40125)
    }
    assert token_calls(fake) == 1  # everyone waiting shared the one failure
    assert fake.stats()["sends"] == 0


async def test_concurrent_sends_share_one_token_fetch(
    fake: FakeWeChat, channel: WeChatChannel
) -> None:
    results = await asyncio.gather(*(channel.send(MESSAGE) for _ in range(500)))
    assert all(r.outcome is Outcome.SENT for r in results)
    assert token_calls(fake) == 1
    assert len({r.msgid for r in results}) == 500

    fake.expire_tokens()
    results = await asyncio.gather(*(channel.send(MESSAGE) for _ in range(200)))
    assert all(r.outcome is Outcome.SENT for r in results)
    assert token_calls(fake) == 2


async def test_a_given_client_is_not_closed(fake: FakeWeChat) -> None:
    assert fake.base_url is not None
    async with httpx.AsyncClient(trust_env=False) as client:
        channel = make_channel(fake.base_url, client=client)
        assert (await channel.send(MESSAGE)).outcome is Outcome.SENT
        await channel.aclose()
        assert not client.is_closed


async def test_a_compressed_reply_is_decoded_and_the_pool_keeps_its_limit() -> None:
    # The channel hands its requests straight to its transport's session: a gzip reply (aiohttp
    # asks for one) is decoded there, as httpx's decoders would.
    import gzip
    import json

    from aiohttp import web

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok", "expires_in": 7200})

    async def send(request: web.Request) -> web.Response:
        assert request.query["access_token"] == "tok"
        assert request.headers["Content-Type"] == "application/json"
        assert json.loads(await request.read())["touser"] == MESSAGE.touser
        body = gzip.compress(b'{"errcode":0,"errmsg":"ok","msgid":42}')
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/cgi-bin/stable_token", token)
    app.router.add_post("/cgi-bin/message/subscribe/send", send)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = make_channel(f"http://127.0.0.1:{port}", max_connections=3)
    try:
        results = await asyncio.gather(*(channel.send(MESSAGE) for _ in range(10)))
        assert {(r.outcome, r.msgid) for r in results} == {(Outcome.SENT, 42)}
        transport = channel._transport
        assert transport is not None and transport.client.connector.limit == 3  # type: ignore[union-attr]
    finally:
        await channel.aclose()
        await runner.cleanup()


async def test_the_daemon_gives_its_channel_a_connection_for_every_send_slot() -> None:
    # A pool smaller than REMINDERS_SEND_CONCURRENCY would cap it: the sends past the pool's
    # size would wait for a connection, however many slots the flight recorder grants.
    from contextlib import AsyncExitStack

    from scheduler.app.daemon import open_channel
    from scheduler.settings import Settings

    for concurrency, pool in ((300, 300), (8, 256)):
        settings = Settings(
            send_concurrency=concurrency,
            wechat_appid="wx-test",
            wechat_secret="s3cret",
            wechat_api_base="http://127.0.0.1:9",  # never called: nothing is sent here
        )
        async with AsyncExitStack() as stack:
            channel = await open_channel(settings, stack)
            assert isinstance(channel, WeChatChannel) and channel._transport is not None
            assert channel._transport.limits.max_connections == pool
