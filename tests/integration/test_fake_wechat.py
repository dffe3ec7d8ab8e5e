"""The fake WeChat over real HTTP on loopback: token rules, send checks, consent, control API."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from scheduler.testing.fake_wechat import FakeWeChat, serve
from tests.support import Clock

SEND = "/cgi-bin/message/subscribe/send"
CREDENTIALS = {"grant_type": "client_credential", "appid": "wx-test", "secret": "s3cret"}
RID = re.compile(r" rid: [0-9a-f]+-[0-9a-f]+$")


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
async def fake(clock: Clock) -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat(clock=clock)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def http(fake: FakeWeChat) -> AsyncIterator[httpx.AsyncClient]:
    assert fake.base_url is not None
    async with httpx.AsyncClient(base_url=fake.base_url, trust_env=False) as client:
        yield client


async def stable_token(http: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    response = await http.post("/cgi-bin/stable_token", json={**CREDENTIALS, **extra})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


async def send(
    http: httpx.AsyncClient, token: str | None, body: Any = None, **fields: Any
) -> dict[str, Any]:
    if body is None:
        body = {
            "touser": "o-user-1",
            "template_id": "tmpl-1",
            "data": {"thing1": {"value": "康复训练"}, "time2": {"value": "2025年3月1日 09:00"}},
            **fields,
        }
    params = {"access_token": token} if token is not None else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http.post(SEND, params=params, content=content)
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


# -- tokens ----------------------------------------------------------------------------------


async def test_stable_token_is_reused_while_it_has_more_than_300_s(
    http: httpx.AsyncClient, clock: Clock
) -> None:
    first = await stable_token(http)
    assert first["expires_in"] == 7200
    clock.now += 6000
    again = await stable_token(http)
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] == 1200


async def test_stable_token_renews_in_its_last_300_s_with_overlap(
    http: httpx.AsyncClient, clock: Clock
) -> None:
    old = (await stable_token(http))["access_token"]
    clock.now += 7200 - 299
    new = (await stable_token(http))["access_token"]
    assert new != old
    assert (await send(http, old))["errcode"] == 0  # both work while they overlap
    assert (await send(http, new))["errcode"] == 0
    assert (await stable_token(http))["access_token"] == new
    clock.now += 300
    assert (await send(http, old))["errcode"] == 42001
    assert (await send(http, new))["errcode"] == 0


async def test_stable_token_force_refresh_invalidates_at_once(http: httpx.AsyncClient) -> None:
    old = (await stable_token(http))["access_token"]
    new = (await stable_token(http, force_refresh=True))["access_token"]
    assert new != old
    assert (await send(http, old))["errcode"] == 40001
    assert (await send(http, new))["errcode"] == 0


async def test_plain_token_rotates_on_every_call(http: httpx.AsyncClient, clock: Clock) -> None:
    async def token() -> str:
        response = await http.get("/cgi-bin/token", params=CREDENTIALS)
        return str(response.json()["access_token"])

    first, second = await token(), await token()
    assert first != second
    clock.now += 299
    assert (await send(http, first))["errcode"] == 0  # the previous one lives 300 s more
    clock.now += 2
    assert (await send(http, first))["errcode"] == 42001
    assert (await send(http, second))["errcode"] == 0


async def test_token_families_are_independent(http: httpx.AsyncClient) -> None:
    stable = (await stable_token(http))["access_token"]
    await http.get("/cgi-bin/token", params=CREDENTIALS)
    await http.get("/cgi-bin/token", params=CREDENTIALS)
    assert (await send(http, stable))["errcode"] == 0


async def test_credentials_are_checked_when_configured() -> None:
    fake = FakeWeChat(appid="wx-test", secret="s3cret")
    base_url = await fake.start()
    try:
        async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
            assert "access_token" in await stable_token(http)
            assert (await stable_token(http, secret="wrong"))["errcode"] == 40125
            assert (await stable_token(http, appid="wx-other"))["errcode"] == 40013
            assert (await stable_token(http, appid=""))["errcode"] == 41002
            assert (await stable_token(http, grant_type="password"))["errcode"] == 40002
    finally:
        await fake.stop()


# -- send ------------------------------------------------------------------------------------


async def test_send_succeeds_with_msgid_and_is_recorded(
    http: httpx.AsyncClient, fake: FakeWeChat
) -> None:
    token = (await stable_token(http))["access_token"]
    answer = await send(http, token, page="pages/index?x=1", miniprogram_state="trial")
    assert answer["errcode"] == 0
    assert answer["errmsg"] == "ok"
    assert isinstance(answer["msgid"], int)
    [message] = fake.messages
    assert message["msgid"] == answer["msgid"]
    assert message["touser"] == "o-user-1"
    assert message["template_id"] == "tmpl-1"
    assert message["page"] == "pages/index?x=1"
    assert message["data"] == {"thing1": "康复训练", "time2": "2025年3月1日 09:00"}
    assert message["miniprogram_state"] == "trial"
    assert isinstance(message["received_at"], float)


async def test_token_errors(http: httpx.AsyncClient, fake: FakeWeChat) -> None:
    token = (await stable_token(http))["access_token"]
    missing = await send(http, None)
    assert missing["errcode"] == 41001
    assert RID.search(missing["errmsg"])
    assert (await send(http, "not-a-token"))["errcode"] == 40001
    fake.expire_tokens()
    assert (await send(http, token))["errcode"] == 42001
    assert fake.messages == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"\xff\xfe", {"template_id": "t", "data": {}}],
    ids=["garbage", "array", "bad-utf8", "no-touser"],
)
async def test_malformed_body_is_47001(http: httpx.AsyncClient, body: Any) -> None:
    token = (await stable_token(http))["access_token"]
    assert (await send(http, token, body))["errcode"] == 47001


async def test_data_as_a_json_string_is_empty(http: httpx.AsyncClient) -> None:
    token = (await stable_token(http))["access_token"]
    data = json.dumps({"thing1": {"value": "x"}})
    answer = await send(http, token, {"touser": "o", "template_id": "t", "data": data})
    assert answer["errcode"] == 47003
    assert answer["errmsg"].startswith("argument invalid! data is empty rid: ")


async def test_invalid_value_names_the_field(http: httpx.AsyncClient) -> None:
    token = (await stable_token(http))["access_token"]
    data = {"thing1": {"value": "ok"}, "thing2": {"value": "x" * 21}}
    answer = await send(http, token, {"touser": "o", "template_id": "t", "data": data})
    assert answer["errcode"] == 47003
    assert answer["errmsg"].startswith("argument invalid! data.thing2.value invalid rid: ")

    data = {"thing1": {"valu": "typo"}}
    answer = await send(http, token, {"touser": "o", "template_id": "t", "data": data})
    assert answer["errmsg"].startswith("argument invalid! data.thing1.value is empty rid: ")


async def test_template_registry(clock: Clock) -> None:
    fake = FakeWeChat(clock=clock, templates={"tmpl-1": ["thing1", "time2"]})
    base_url = await fake.start()
    try:
        async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
            token = (await stable_token(http))["access_token"]
            assert (await send(http, token))["errcode"] == 0
            assert (await send(http, token, template_id="tmpl-9"))["errcode"] == 40037
            short = await send(http, token, data={"thing1": {"value": "x"}})
            assert short["errcode"] == 47003
            assert "data.time2" in short["errmsg"]
            extra = {
                "thing1": {"value": "x"},
                "time2": {"value": "09:00"},
                "thing3": {"value": "y"},
            }
            assert (await send(http, token, data=extra))["errcode"] == 47003
    finally:
        await fake.stop()


async def test_consent_credits_are_consumed(http: httpx.AsyncClient, fake: FakeWeChat) -> None:
    fake.check_consent = True
    token = (await stable_token(http))["access_token"]
    assert (await send(http, token))["errcode"] == 43101

    fake.grant("o-user-1", "tmpl-1", count=2)
    assert (await send(http, token))["errcode"] == 0
    assert fake.credits("o-user-1", "tmpl-1") == 1
    bad = await send(http, token, data={"thing1": {"value": ""}})
    assert bad["errcode"] == 47003  # a refused send uses no credit
    assert (await send(http, token))["errcode"] == 0
    assert (await send(http, token))["errcode"] == 43101

    fake.grant("o-user-1", "tmpl-1", kind="long_term")
    for _ in range(3):
        assert (await send(http, token))["errcode"] == 0
    fake.revoke("o-user-1", "tmpl-1")
    assert (await send(http, token))["errcode"] == 43101


async def test_injected_faults_come_in_order(http: httpx.AsyncClient, fake: FakeWeChat) -> None:
    token = (await stable_token(http))["access_token"]
    fake.inject([-1, 45009])
    fake.inject(http_status=503, times=2)
    assert (await send(http, token))["errcode"] == -1
    assert (await send(http, token))["errcode"] == 45009
    for _ in range(2):
        response = await http.post(SEND, params={"access_token": token}, content=b"{}")
        assert response.status_code == 503
    assert (await send(http, token))["errcode"] == 0
    assert len(fake.messages) == 1


async def test_injected_latency(http: httpx.AsyncClient, fake: FakeWeChat) -> None:
    token = (await stable_token(http))["access_token"]
    fake.inject(latency_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await send(http, token))["errcode"] == 0
    assert loop.time() - started >= 0.2


# -- control endpoints -----------------------------------------------------------------------


async def test_control_endpoints(http: httpx.AsyncClient, fake: FakeWeChat) -> None:
    fake.check_consent = True
    token = (await stable_token(http))["access_token"]

    grant = {"openid": "o-user-1", "template_id": "tmpl-1", "count": 1}
    assert (await http.post("/fake/grant", json=grant)).status_code == 200
    assert (await send(http, token))["errcode"] == 0
    assert (await send(http, token))["errcode"] == 43101

    messages = (await http.get("/fake/messages")).json()
    assert [m["touser"] for m in messages] == ["o-user-1"]
    assert (await http.delete("/fake/messages")).json() == {"cleared": 1}
    assert (await http.get("/fake/messages")).json() == []

    inject = {"errcodes": [-1], "times": 2}
    assert (await http.post("/fake/inject", json=inject)).json() == {"queued": 2}
    assert (await send(http, token))["errcode"] == -1

    assert (await http.post("/fake/expire-tokens")).status_code == 200
    assert (await send(http, token))["errcode"] == -1  # the second injected fault comes first
    assert (await send(http, token))["errcode"] == 42001

    stats = (await http.get("/fake/stats")).json()
    assert stats["errcodes"] == {"-1": 2, "0": 1, "42001": 1, "43101": 1}
    assert stats["sends"] == 5
    assert stats["token_calls"] == {"stable_token": 1}

    bad = await http.post("/fake/grant", json={"openid": "o"})
    assert bad.status_code == 400


async def test_serve_prints_its_url_and_stops_when_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(serve("127.0.0.1", 0, check_consent=True))
    try:
        for _ in range(100):
            out = capsys.readouterr().out
            if out:
                break
            await asyncio.sleep(0.02)
        base_url = out.strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
            assert (await http.get("/fake/stats")).json()["sends"] == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
