"""Hostile pushes at WeChat's callback, on loopback over a real PostgreSQL: DTDs and entities in
any encoding, bombs of elements and nesting, numbers out of range, text PostgreSQL cannot store,
odd query values. Each is a 400 (or 413) with a reason, answered quickly, and stores nothing;
503 is kept for a callback that really is not configured."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import httpx
import pytest

from scheduler.store.postgres import Store
from tests.ingest_helpers import ONE_TIME_TEMPLATE, register, rehab_plan, serve
from tests.wechat_pushes import (
    TOKEN,
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
NOW = int(time.time())
POPUP = event("subscribe_msg_popup_event", U1, [popup(ONE_TIME_TEMPLATE)], NOW)
DTD = '<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'


def popup_json(**fields) -> bytes:
    return json.dumps({**POPUP, **fields}).encode()


def raw_json(fragment: str) -> bytes:
    """A popup whose CreateTime is the raw JSON `fragment` (a number json.dumps cannot write)."""
    return popup_json(CreateTime="@@").replace(b'"@@"', fragment.encode())


def sent_xml(msgid: str, code: str = "0") -> bytes:
    doc = event("subscribe_msg_sent_event", U1, [sent(ONE_TIME_TEMPLATE, 1, 0)], NOW)
    doc["List"][0].update(MsgID=msgid, ErrorCode=code)
    return to_xml(doc)


def inner_safe(inner: bytes) -> tuple[str, bytes]:
    body, encrypted = safe_body(inner, "xml")
    return signed_query(encrypted), body


def query_with(timestamp: str = "", nonce: str = "n1") -> str:
    """A correctly signed query whose timestamp or nonce is odd."""
    timestamp = timestamp or str(int(time.time()))
    signature = sha1_sign(TOKEN, timestamp, nonce)
    return urlencode({"signature": signature, "timestamp": timestamp, "nonce": nonce})


# name -> (query, body, status, code); queries are signed when the test runs
HOSTILE = {
    "dtd-utf8": (None, f'<?xml version="1.0"?>{DTD}<xml><a>&b;</a></xml>'.encode(), 400, None),
    "dtd-utf16": (
        None,
        f'<?xml version="1.0" encoding="UTF-16"?>{DTD}<xml><a>&b;</a></xml>'.encode("utf-16"),
        400,
        None,
    ),
    "dtd-utf16-no-declaration": (None, f"{DTD}<xml><a>&b;</a></xml>".encode("utf-16"), 400, None),
    "external-entity": (
        None,
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><a>&e;</a></xml>',
        400,
        None,
    ),
    "undefined-entity": (None, b"<xml><a>&e;</a></xml>", 400, "malformed_body"),
    "110k-repeated-elements": (None, b"<xml>" + b"<A>1</A>" * 110_000 + b"</xml>", 413, None),
    "many-elements": (None, b"<xml>" + b"<A/>" * 15_000 + b"</xml>", 400, "malformed_body"),
    "deep-xml": (None, b"<a>" * 9_000 + b"</a>" * 9_000, 400, "malformed_body"),
    "deep-json": (None, b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "malformed_body"),
    "create-time-20-digits": (
        None,
        to_xml({**POPUP, "CreateTime": "9" * 20}),
        400,
        "malformed_event",
    ),
    "create-time-non-ascii-digits": (
        None,
        to_xml({**POPUP, "CreateTime": "١٧٠٠٠٠٠٠٠٠"}),
        400,
        "malformed_event",
    ),
    "create-time-1e400": (None, raw_json("1e400"), 400, "malformed_body"),
    "create-time-nan": (None, raw_json("NaN"), 400, "malformed_body"),
    "create-time-huge-integer": (None, raw_json("9" * 5000), 400, "malformed_body"),
    "create-time-year-1": (None, raw_json("-62135596800"), 400, "malformed_event"),
    "msgid-2-to-64": (None, sent_xml(str(2**64)), 400, "malformed_event"),
    "errcode-beyond-int32": (None, sent_xml("1", str(2**40)), 400, "malformed_event"),
    "nul-in-json": (None, popup_json(Extra="a\x00b"), 400, "malformed_body"),
    "surrogate-in-json": (None, popup_json().replace(b'"event"', b'"\\ud800"'), 400, None),
    "surrogate-key-in-json": (None, b'{"\\udc80": 1, ' + popup_json()[1:], 400, None),
    "json-array": (None, b"[1, 2]", 400, "malformed_body"),
    "encrypt-not-text": (None, b'{"Encrypt": {"a": 1}}', 400, "malformed_body"),
    "dtd-inside-safe-mode": (
        "safe",
        f"{DTD}<xml><a>&b;</a></xml>".encode("utf-16"),
        400,
        "malformed_body",
    ),
    "timestamp-non-ascii-digits": (
        lambda: query_with(timestamp="١٧٠٠٠٠٠٠٠٠"),
        to_xml(POPUP),
        400,
        "malformed_request",
    ),
    "timestamp-superscript": (lambda: query_with(timestamp="¹²³"), to_xml(POPUP), 400, None),
    "timestamp-5000-digits": (lambda: query_with(timestamp="1" * 5000), to_xml(POPUP), 400, None),
    "nul-in-nonce": (lambda: query_with(nonce="a\x00b"), to_xml(POPUP), 400, "malformed_request"),
}


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    await register(store, rehab_plan())
    async with serve(store, max_body_bytes=1_048_576) as client:  # the default limit
        yield client


async def test_hostile_pushes_are_refused_quickly_with_a_reason(api, store):
    wrong, slowest = {}, 0.0
    for name, (query, body, status, code) in HOSTILE.items():
        if query == "safe":
            url_query, body = inner_safe(body)
        else:
            url_query = query() if query else signed_query()
        started = time.perf_counter()
        response = await api.post(f"/wechat/callback?{url_query}", content=body)
        slowest = max(slowest, time.perf_counter() - started)
        is_json = response.headers.get("content-type", "").startswith("application/json")
        error = response.json().get("error", {}) if is_json else {}
        if response.status_code != status or (code and error.get("code") != code):
            wrong[name] = (response.status_code, response.text[:200])
        elif not error.get("message"):
            wrong[name] = "no reason given"
    assert wrong == {}
    assert slowest < 1.0, f"a hostile push took {slowest:.2f} s"
    assert await store.pool.fetchval("SELECT count(*) FROM consent_events") == 0
    ok = await api.post(f"/wechat/callback?{signed_query()}", content=to_json(POPUP))
    assert ok.text == "success"  # and the callback keeps working


async def test_503_only_when_safe_mode_really_is_not_configured(store):
    await register(store, rehab_plan())
    query, body = inner_safe(to_xml(POPUP))
    async with serve(store, wechat_encoding_aes_key=None, wechat_push_mode=None) as client:
        response = await client.post(f"/wechat/callback?{query}", content=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "callback_not_configured"
        # Bad input is still bad input, whatever is configured.
        response = await client.post(
            f"/wechat/callback?{signed_query()}", content=to_xml({**POPUP, "CreateTime": "¹²³"})
        )
        assert response.status_code == 400
