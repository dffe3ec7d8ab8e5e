"""WeChat's message push on loopback over a real PostgreSQL: the URL check, signatures, replays,
plaintext and safe mode, XML and JSON, dedupe, and the sent event's msgid update."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from scheduler.store.consent import ConsentStore
from scheduler.store.postgres import ClaimBatch, Due, Finished, Store
from tests.ingest_helpers import (
    INGEST,
    LONG_TERM_TEMPLATE,
    ONE_TIME_TEMPLATE,
    alerts_plan,
    register,
    rehab_plan,
    serve,
)
from tests.wechat_pushes import (
    TOKEN,
    aes_encrypt,
    change,
    event,
    popup,
    safe_body,
    sent,
    sha1_sign,
    signed_query,
    to_json,
    to_xml,
)

U1 = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
POPUP = "subscribe_msg_popup_event"


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    await register(store, rehab_plan())
    await register(store, alerts_plan())
    async with serve(store) as client:
        yield client
    assert await ConsentStore(store.pool).mismatches() == {}


async def credits(store: Store, template: str = ONE_TIME_TEMPLATE) -> int:
    return await store.pool.fetchval(
        "SELECT coalesce(max(credits), 0) FROM consent WHERE user_id = $1 AND template_id = $2",
        U1,
        template,
    )


async def events_stored(store: Store) -> int:
    return await store.pool.fetchval("SELECT count(*) FROM consent_events")


def popup_doc(*items, created: int | None = None) -> dict:
    return event(POPUP, U1, list(items) or [popup(ONE_TIME_TEMPLATE)], created or int(time.time()))


# --- the URL check -------------------------------------------------------------------------------


async def test_handshake_echoes_echostr_exactly(api):
    echostr = "7212637193512870393"
    response = await api.get(f"/wechat/callback?{signed_query(extra={'echostr': echostr})}")
    assert response.status_code == 200 and response.text == echostr
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        (lambda: signed_query(token="wrong", extra={"echostr": "e"}), 403, "bad_signature"),
        (lambda: "echostr=e&timestamp=1&nonce=2", 401, "unauthenticated"),
        (
            lambda: signed_query(timestamp=int(time.time()) - 3600, extra={"echostr": "e"}),
            403,
            "stale_request",
        ),
    ],
    ids=["bad-signature", "missing-signature", "stale"],
)
async def test_handshake_refusals(api, query, status, code):
    response = await api.get(f"/wechat/callback?{query()}")
    assert response.status_code == status and response.json()["error"]["code"] == code


async def test_without_a_configured_token_the_callback_says_so(store):
    async with serve(store, wechat_callback_token=None) as client:
        response = await client.get(f"/wechat/callback?{signed_query(extra={'echostr': 'e'})}")
    assert response.status_code == 503
    assert "REMINDERS_WECHAT_CALLBACK_TOKEN" in response.json()["error"]["message"]


# --- plaintext pushes in every shape -------------------------------------------------------------

SHAPES = {
    "xml-wrapped": lambda d: to_xml(d),
    "xml-bare": lambda d: to_xml(d, wrapper=False),
    "json-object": lambda d: to_json(d, as_array=False),
    "json-array": lambda d: to_json(d, as_array=True),
    "json-wrapped": lambda d: to_json(d, wrapper=True),
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_popup_accepts_add_credits_in_every_shape(api, store, shape):
    items = [popup(ONE_TIME_TEMPLATE)]
    if shape != "json-object":  # one entry is an object; several are an array
        items.append(popup(LONG_TERM_TEMPLATE))
    response = await api.post(
        f"/wechat/callback?{signed_query()}", content=SHAPES[shape](popup_doc(*items))
    )
    assert (response.status_code, response.text) == (200, "success")
    assert await credits(store) == 1
    long_term = await store.pool.fetchval(
        "SELECT long_term FROM consent WHERE template_id = $1", LONG_TERM_TEMPLATE
    )
    assert long_term is (True if len(items) == 2 else None)


async def test_a_retried_push_is_applied_once(api, store):
    body = to_xml(popup_doc())
    for nonce in ("a1", "a2", "a3"):  # WeChat's retries sign afresh
        response = await api.post(f"/wechat/callback?{signed_query(nonce=nonce)}", content=body)
        assert response.text == "success"
    assert await credits(store) == 1 and await events_stored(store) == 1


async def test_a_second_tap_later_is_a_second_credit(api, store):
    now = int(time.time())
    for created in (now - 60, now):
        await api.post(
            f"/wechat/callback?{signed_query()}", content=to_json(popup_doc(created=created))
        )
    assert await credits(store) == 2


async def test_the_backends_report_and_wechats_push_of_one_tap_count_once(api, store):
    report = {"openid": U1, "kind": "one_time", "results": {ONE_TIME_TEMPLATE: "accept"}}
    assert (await api.post("/v1/consent", headers=INGEST, json={"popups": [report]})).is_success
    await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc()))
    assert await credits(store) == 1
    history = await ConsentStore(store.pool).history(U1, ONE_TIME_TEMPLATE)
    assert [(h["source"], h["corroborates"]) for h in history] == [
        ("api:crm", None),
        ("wechat:callback", history[0]["id"]),
    ]


async def test_a_popup_reject_for_a_long_term_template_turns_it_off(api, store):
    await api.post(
        f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc(popup(LONG_TERM_TEMPLATE)))
    )
    later = popup_doc(popup(LONG_TERM_TEMPLATE, "reject"), created=int(time.time()) + 1)
    await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(later))
    assert not await store.pool.fetchval("SELECT long_term FROM consent")


async def test_a_change_event_clears_one_time_credits(api, store):
    now = int(time.time())
    for created in (now - 2, now - 1):
        await api.post(
            f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc(created=created))
        )
    doc = event("subscribe_msg_change_event", U1, [change(ONE_TIME_TEMPLATE)], now)
    await api.post(f"/wechat/callback?{signed_query()}", content=to_json(doc))
    assert await credits(store) == 0


async def test_an_event_for_a_template_no_plan_uses_is_kept(api, store):
    await api.post(
        f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc(popup("tmpl_new")))
    )
    row = await store.pool.fetchrow("SELECT kind, result FROM consent_events")
    assert (row["kind"], row["result"]) == (None, "accept")


async def test_other_events_are_acknowledged(api, store):
    body = (
        f"<xml><ToUserName>gh_1</ToUserName><FromUserName>{U1}</FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime><MsgType>event</MsgType>"
        "<Event>user_enter_tempsession</Event></xml>"
    ).encode()
    assert (await api.post(f"/wechat/callback?{signed_query()}", content=body)).text == "success"


# --- safe mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["xml", "json"])
async def test_safe_mode_pushes_are_decrypted(api, store, fmt):
    inner = to_xml(popup_doc()) if fmt == "xml" else to_json(popup_doc())
    body, encrypted = safe_body(inner, fmt)
    response = await api.post(f"/wechat/callback?{signed_query(encrypted)}", content=body)
    assert (response.status_code, response.text) == (200, "success")
    assert await credits(store) == 1


async def test_safe_mode_refusals(api, store):
    body, encrypted = safe_body(to_xml(popup_doc()), "xml")
    ts, nonce = str(int(time.time())), "n1"
    wrong_msg_signature = (
        f"signature={sha1_sign(TOKEN, ts, nonce)}&timestamp={ts}&nonce={nonce}"
        f"&encrypt_type=aes&msg_signature={sha1_sign(TOKEN, ts, nonce, 'other')}"
    )
    response = await api.post(f"/wechat/callback?{wrong_msg_signature}", content=body)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "bad_signature")

    other_app = aes_encrypt(to_xml(popup_doc()), appid="wx_someone_else")
    body = f"<xml><Encrypt><![CDATA[{other_app}]]></Encrypt></xml>".encode()
    response = await api.post(f"/wechat/callback?{signed_query(other_app)}", content=body)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "wrong_appid")

    garbage = "QUJDREVGR0hJSktMTU5PUA=="
    body = f"<xml><Encrypt>{garbage}</Encrypt></xml>".encode()
    response = await api.post(f"/wechat/callback?{signed_query(garbage)}", content=body)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "bad_ciphertext")
    assert await events_stored(store) == 0


# --- refusals of plaintext pushes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "body", "status", "code"),  # queries signed when the test runs
    [
        (lambda: signed_query(token="wrong"), to_xml(popup_doc()), 403, "bad_signature"),
        (lambda: "timestamp=1&nonce=2", to_xml(popup_doc()), 401, "unauthenticated"),
        (
            lambda: signed_query(timestamp=int(time.time()) - 600),
            to_xml(popup_doc()),
            403,
            "stale_request",
        ),
        (signed_query, b"<xml><FromUserName>", 400, "malformed_body"),
        (signed_query, b'{"FromUserName": ', 400, "malformed_body"),
        (
            signed_query,
            to_json({**popup_doc(), "FromUserName": "bad openid!"}),
            400,
            "malformed_event",
        ),
        (
            signed_query,
            to_json({**popup_doc(), "List": []}, as_array=True),
            400,
            "malformed_event",
        ),
        (signed_query, b"<xml>" + b"x" * 70_000 + b"</xml>", 413, "body_too_large"),
    ],
    ids=[
        "bad-signature",
        "no-signature",
        "replayed",
        "bad-xml",
        "bad-json",
        "bad-openid",
        "empty-list",
        "oversized",
    ],
)
async def test_bad_pushes_are_refused_and_store_nothing(api, store, query, body, status, code):
    response = await api.post(f"/wechat/callback?{query()}", content=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert await events_stored(store) == 0
    ok = await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc()))
    assert ok.text == "success"  # and the daemon keeps going


# --- the sent event ------------------------------------------------------------------------------


async def test_sent_events_record_the_final_result_by_msgid(api, store):
    await api.post(
        f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc(popup(LONG_TERM_TEMPLATE)))
    )
    batch = ClaimBatch("alerts", 1, LONG_TERM_TEMPLATE, "long_term", "t")
    now = datetime.now(UTC)
    claims = await store.claim(
        store.pool, batch, [Due("o1", U1, 1, now, {}), Due("o2", U1, 2, now, {})]
    )
    assert all(c.allowed for c in claims)
    await store.finish(
        LONG_TERM_TEMPLATE,
        "long_term",
        [Finished(c.delivery_id, "sent", None, 0, 9000 + i, None) for i, c in enumerate(claims)],
    )
    doc = event(
        "subscribe_msg_sent_event",
        U1,
        [sent(LONG_TERM_TEMPLATE, 9000, 0), sent(LONG_TERM_TEMPLATE, 9001, 10005)],
        int(time.time()),
    )
    for _ in range(2):  # a retry changes nothing more
        response = await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(doc))
        assert response.text == "success"
    rows = await store.pool.fetch(
        "SELECT msgid, status, reason, errcode, push_errcode, push_status FROM deliveries"
        " ORDER BY msgid"
    )
    assert [tuple(r) for r in rows] == [
        (9000, "sent", None, 0, 0, "success"),
        (9001, "failed", "push_failed", 10005, 10005, "send failed"),
    ]


async def test_a_sent_event_applies_only_to_its_own_user_and_template(api, store):
    # A msgid alone is not proof: an event naming another user (or another template) for a
    # delivery's msgid must not change that delivery.
    await api.post(
        f"/wechat/callback?{signed_query()}", content=to_xml(popup_doc(popup(LONG_TERM_TEMPLATE)))
    )
    batch = ClaimBatch("alerts", 1, LONG_TERM_TEMPLATE, "long_term", "t")
    [claim] = await store.claim(store.pool, batch, [Due("o1", U1, 1, datetime.now(UTC), {})])
    await store.finish(
        LONG_TERM_TEMPLATE, "long_term", [Finished(claim.delivery_id, "sent", None, 0, 9000, None)]
    )
    forged = [
        event(
            "subscribe_msg_sent_event",
            "o" + "X" * 27,
            [sent(LONG_TERM_TEMPLATE, 9000, 10005)],
            int(time.time()),
        ),
        event(
            "subscribe_msg_sent_event",
            U1,
            [sent("another-template", 9000, 10005)],
            int(time.time()),
        ),
    ]
    for doc in forged:
        response = await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(doc))
        assert response.text == "success"
    row = await store.pool.fetchrow("SELECT status, push_errcode FROM deliveries")
    assert (row["status"], row["push_errcode"]) == ("sent", None)
