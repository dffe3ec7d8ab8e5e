"""Signatures, safe-mode AES and event parsing of WeChat's message push."""

from __future__ import annotations

import pytest

from scheduler.channels import wechat_push as push
from tests.wechat_pushes import (
    APPID,
    ENCODING_AES_KEY,
    TOKEN,
    aes_encrypt,
    change,
    event,
    popup,
    sent,
    sha1_sign,
    to_json,
    to_xml,
)

OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"


def test_signature_matches_an_independent_sha1():
    assert push.signature(TOKEN, "1700000000", "abc") == sha1_sign(TOKEN, "1700000000", "abc")
    assert push.signature_ok(sha1_sign(TOKEN, "1", "n").upper(), TOKEN, "1", "n")
    assert not push.signature_ok(sha1_sign("other", "1", "n"), TOKEN, "1", "n")
    assert not push.signature_ok(None, TOKEN, "1", "n")


def test_aes_round_trip_and_interop_with_the_tests_own_cipher():
    key = push.aes_key(ENCODING_AES_KEY)
    assert len(key) == 32
    message = "<xml><Event>测试</Event></xml>".encode()
    assert push.decrypt(key, aes_encrypt(message), APPID) == message
    assert push.decrypt(key, push.encrypt(key, message, APPID), APPID) == message


def test_decrypt_refuses_another_appid_and_garbage():
    key = push.aes_key(ENCODING_AES_KEY)
    with pytest.raises(push.PushError) as wrong:
        push.decrypt(key, aes_encrypt(b"x", appid="wxother"), APPID)
    assert wrong.value.code == "wrong_appid"
    for garbage in ("not base64!", "QUJD", aes_encrypt(b"x")[:-8] + "AAAAAAA="):
        with pytest.raises(push.PushError) as bad:
            push.decrypt(key, garbage, APPID)
        assert bad.value.status == 400


def test_aes_key_must_be_43_characters():
    with pytest.raises(ValueError, match="43 characters"):
        push.aes_key("short")


POPUP_DOC = event(
    "subscribe_msg_popup_event",
    OPENID,
    [popup("tmpl_a", "accept"), popup("tmpl_b", "reject")],
    1700000000,
)


@pytest.mark.parametrize(
    "body",
    [
        to_xml(POPUP_DOC),
        to_xml(POPUP_DOC, wrapper=False),
        to_json(POPUP_DOC),
        to_json(POPUP_DOC, wrapper=True),
    ],
    ids=["xml-wrapped", "xml-bare", "json", "json-wrapped"],
)
def test_popup_events_parse_in_every_shape(body):
    _, doc = push.parse_document(body)
    parsed = push.parse_event(doc)
    assert parsed.event == push.POPUP and parsed.from_user == OPENID
    assert parsed.create_time == 1700000000
    assert [(c.template_id, c.status) for c in parsed.choices] == [
        ("tmpl_a", "accept"),
        ("tmpl_b", "reject"),
    ]
    assert parsed.event_id("tmpl_a") == f"wx:{push.POPUP}:{OPENID}:1700000000:tmpl_a"


@pytest.mark.parametrize("as_array", [False, True])
@pytest.mark.parametrize("wrapper", [False, True])
def test_a_single_list_entry_may_be_an_object_or_an_array(as_array, wrapper):
    doc = event("subscribe_msg_sent_event", OPENID, [sent("tmpl_a", 7001, 0)], 1700000001)
    parsed = push.parse_event(
        push.parse_document(to_json(doc, wrapper=wrapper, as_array=as_array))[1]
    )
    assert parsed.sent == (push.SentReport("tmpl_a", 7001, 0, "success"),)


def test_change_event_in_xml():
    doc = event("subscribe_msg_change_event", OPENID, [change("tmpl_a")], 1700000002)
    parsed = push.parse_event(push.parse_document(to_xml(doc))[1])
    assert parsed.event == push.CHANGE and parsed.choices[0].status == "reject"


def test_other_events_parse_without_items():
    body = (
        b"<xml><ToUserName>gh_1</ToUserName><FromUserName>o1</FromUserName>"
        b"<CreateTime>1700000000</CreateTime><MsgType>event</MsgType>"
        b"<Event>user_enter_tempsession</Event>"
        b"</xml>"
    )
    parsed = push.parse_event(push.parse_document(body)[1])
    assert parsed.event == "user_enter_tempsession" and not parsed.choices


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"<xml><unclosed></xml>", "malformed_body"),
        (b"{not json", "malformed_body"),
        (b"[1, 2]", "malformed_body"),
        (b"hello", "malformed_body"),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><xml>&a;</xml>',
            "malformed_body",
        ),
    ],
    ids=["xml", "json", "json-array", "neither", "entities"],
)
def test_malformed_bodies_are_refused(body, code):
    with pytest.raises(push.PushError) as caught:
        push.parse_document(body)
    assert (caught.value.status, caught.value.code) == (400, code)


@pytest.mark.parametrize(
    "doc",
    [
        {**POPUP_DOC, "CreateTime": "yesterday"},
        {k: v for k, v in POPUP_DOC.items() if k != "List"},
        {**POPUP_DOC, "List": [{"TemplateId": "t", "SubscribeStatusString": "maybe"}]},
        {k: v for k, v in POPUP_DOC.items() if k != "FromUserName"},
        event("subscribe_msg_sent_event", OPENID, [{"TemplateId": "t", "MsgID": "x"}], 1),
    ],
    ids=["create-time", "no-list", "bad-status", "no-openid", "bad-msgid"],
)
def test_malformed_events_are_refused(doc):
    with pytest.raises(push.PushError) as caught:
        push.parse_event(doc)
    assert caught.value.code == "malformed_event"
