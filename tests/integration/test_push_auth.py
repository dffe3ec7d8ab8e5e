"""Push authentication (issue 10): the configured message-push mode decides what counts, and each
signed query is accepted once across replicas. Signatures and encryption come from the tests' own
from-the-spec helper (tests/wechat_pushes.py), not from the code under test."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from scheduler.settings import Settings
from scheduler.store.postgres import Store
from tests.ingest_helpers import ONE_TIME_TEMPLATE, register, rehab_plan, serve
from tests.wechat_pushes import event, popup, safe_body, signed_query, to_json, to_xml

U1 = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
FORGED = "oFORGEDxxxxxxxxxxxxxxxxxxxxx"


def popup_of(openid: str, later_s: int = 0) -> dict:
    created = int(time.time()) + later_s
    return event("subscribe_msg_popup_event", openid, [popup(ONE_TIME_TEMPLATE)], created)


def genuine_safe_push() -> tuple[str, bytes]:
    body, encrypted = safe_body(to_xml(popup_of(U1)), "xml")
    return signed_query(encrypted), body


def downgraded(query: str) -> str:
    """The same timestamp, nonce and signature, without encrypt_type and msg_signature."""
    kept = {k: v for k, v in parse_qsl(query) if k in ("signature", "timestamp", "nonce")}
    return urlencode(kept)


async def credited(store: Store, openid: str) -> int:
    return await store.pool.fetchval(
        "SELECT coalesce(sum(credits), 0) FROM consent WHERE user_id = $1", openid
    )


@pytest.fixture
async def plan(store: Store) -> None:
    await register(store, rehab_plan())


@pytest.fixture
async def safe(store: Store, plan) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(store, wechat_push_mode="safe") as client:
        yield client


async def test_safe_mode_refuses_the_downgrade_to_a_plaintext_post(safe, store):
    query, body = genuine_safe_push()
    assert (await safe.post(f"/wechat/callback?{query}", content=body)).text == "success"

    forged = to_xml(popup_of(FORGED))
    for attempt in (downgraded(query), signed_query()):  # reused, or even freshly signed
        response = await safe.post(f"/wechat/callback?{attempt}", content=forged)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "encryption_required"
    assert (await credited(store, U1), await credited(store, FORGED)) == (1, 0)


async def test_compatible_mode_the_encrypted_part_is_what_counts(store, plan):
    async with serve(store, wechat_push_mode="compatible") as client:
        # What compatible mode sends: the plaintext fields and Encrypt; here the plaintext part
        # is forged. The encrypted part (for U1) is what is applied.
        encrypted = safe_body(to_json(popup_of(U1)), "json")[1]
        body = json.dumps({**json.loads(to_json(popup_of(FORGED))), "Encrypt": encrypted})
        response = await client.post(f"/wechat/callback?{signed_query(encrypted)}", content=body)
        assert response.text == "success"
        # An encrypted part without its msg_signature is refused, not read as plaintext.
        response = await client.post(f"/wechat/callback?{signed_query()}", content=body)
        assert response.status_code == 403
        # A plaintext push is still accepted in compatible mode.
        response = await client.post(
            f"/wechat/callback?{signed_query()}", content=to_xml(popup_of(U1, later_s=1))
        )
        assert response.text == "success"
    assert (await credited(store, U1), await credited(store, FORGED)) == (2, 0)


async def test_a_signed_query_is_accepted_once_across_two_replicas(store, db_url, plan):
    query, body = genuine_safe_push()
    async with (
        Store.open(db_url) as other_store,
        serve(store, wechat_push_mode="compatible") as a,
        serve(other_store, wechat_push_mode="compatible") as b,
    ):
        assert (await a.post(f"/wechat/callback?{query}", content=body)).text == "success"
        for replica, attempt in ((b, query), (a, query), (b, downgraded(query))):
            content = body if attempt == query else to_xml(popup_of(FORGED))
            response = await replica.post(f"/wechat/callback?{attempt}", content=content)
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "replayed_request"
    assert (await credited(store, U1), await credited(store, FORGED)) == (1, 0)


async def test_remembered_queries_are_pruned_after_the_freshness_window(safe, store):
    # A query received 9 minutes ago may still carry a timestamp fresh for another minute (5
    # minutes each side of now): it is kept; one from 12 minutes ago never can, and goes.
    await store.pool.execute(
        "INSERT INTO push_replay (timestamp, nonce, signature, received_at)"
        " VALUES (1, 'old', 'x', now() - interval '12 minutes'),"
        " (2, 'recent', 'y', now() - interval '9 minutes')"
    )
    query, body = genuine_safe_push()
    assert (await safe.post(f"/wechat/callback?{query}", content=body)).text == "success"
    nonces = {r["nonce"] for r in await store.pool.fetch("SELECT nonce FROM push_replay")}
    assert "old" not in nonces and "recent" in nonces and len(nonces) == 2


async def test_a_refused_push_does_not_use_up_its_signed_query(safe, store):
    query, body = genuine_safe_push()
    bad = await safe.post(f"/wechat/callback?{query}", content=b"<xml><Encrypt>AAAA</Encrypt>")
    assert bad.status_code == 400
    assert (await safe.post(f"/wechat/callback?{query}", content=body)).text == "success"


async def test_a_push_that_could_not_be_applied_does_not_use_up_its_signed_query(safe, store):
    query, body = genuine_safe_push()
    await store.pool.execute("ALTER TABLE consent_events RENAME TO consent_events_away")
    failed = await safe.post(f"/wechat/callback?{query}", content=body)
    assert failed.status_code >= 500  # not applied: WeChat retries it
    await store.pool.execute("ALTER TABLE consent_events_away RENAME TO consent_events")
    assert (await safe.post(f"/wechat/callback?{query}", content=body)).text == "success"
    assert await credited(store, U1) == 1


async def test_plaintext_mode_says_an_encrypted_push_needs_configuring(store, plan):
    query, body = genuine_safe_push()
    async with serve(store, wechat_push_mode="plaintext") as client:
        response = await client.post(f"/wechat/callback?{query}", content=body)
    assert response.status_code == 503
    assert "REMINDERS_WECHAT_PUSH_MODE" in response.json()["error"]["message"]


def test_the_push_mode_defaults_to_safe_with_a_key_and_needs_one_for_safe():
    assert Settings().push_mode == "plaintext"
    assert Settings(wechat_encoding_aes_key="k" * 43).push_mode == "safe"
    with pytest.raises(ValueError, match="REMINDERS_WECHAT_ENCODING_AES_KEY"):
        Settings(wechat_push_mode="safe")
