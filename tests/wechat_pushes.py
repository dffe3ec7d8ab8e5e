"""Sample WeChat message pushes built from the field tables of wechat-api.md §6, signed with the
test's own SHA-1 and, for safe mode, encrypted with the test's own AES-256-CBC (independently of
`scheduler.channels.wechat_push`, so a shared mistake cannot hide)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import time
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TOKEN = "callback-token-xyz"
ENCODING_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters
APPID = "wx1234567890abcdef"
ORIGINAL_ID = "gh_123456789abc"

EVENT_WRAPPERS = {
    "subscribe_msg_popup_event": "SubscribeMsgPopupEvent",
    "subscribe_msg_change_event": "SubscribeMsgChangeEvent",
    "subscribe_msg_sent_event": "SubscribeMsgSentEvent",
}


def sha1_sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def aes_encrypt(message: bytes, appid: str = APPID, key_text: str = ENCODING_AES_KEY) -> str:
    key = base64.b64decode(key_text + "=")
    plain = os.urandom(16) + struct.pack(">I", len(message)) + message + appid.encode()
    pad = 32 - len(plain) % 32
    plain += bytes([pad]) * pad
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode()


def event(kind: str, openid: str, items: list[dict[str, str]], create_time: int) -> dict[str, Any]:
    return {
        "ToUserName": ORIGINAL_ID,
        "FromUserName": openid,
        "CreateTime": str(create_time),
        "MsgType": "event",
        "Event": kind,
        "List": items,
    }


def popup(template_id: str, status: str = "accept") -> dict[str, str]:
    return {"TemplateId": template_id, "SubscribeStatusString": status, "PopupScene": "0"}


def change(template_id: str) -> dict[str, str]:
    return {"TemplateId": template_id, "SubscribeStatusString": "reject"}


def sent(template_id: str, msgid: int, code: int = 0) -> dict[str, str]:
    status = "success" if code == 0 else "send failed"
    return {
        "TemplateId": template_id,
        "MsgID": str(msgid),
        "ErrorCode": str(code),
        "ErrorStatus": status,
    }


def to_xml(doc: dict[str, Any], *, wrapper: bool = True) -> bytes:
    """The XML shape: a per-event wrapper element holding one <List> per template."""
    head = "".join(
        f"<{k}><![CDATA[{v}]]></{k}>" if k != "CreateTime" else f"<{k}>{v}</{k}>"
        for k, v in doc.items()
        if k != "List"
    )
    lists = "".join(
        "<List>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in item.items()) + "</List>"
        for item in doc["List"]
    )
    if wrapper:
        name = EVENT_WRAPPERS[doc["Event"]]
        lists = f"<{name}>{lists}</{name}>"
    return f"<xml>{head}{lists}</xml>".encode()


def to_json(doc: dict[str, Any], *, wrapper: bool = False, as_array: bool | None = None) -> bytes:
    """The JSON shape: top-level List (officially), an object for one item unless `as_array`."""
    items = doc["List"]
    if as_array is None:
        as_array = len(items) > 1
    listed: Any = items if as_array else items[0]
    body = {k: v for k, v in doc.items() if k != "List"}
    if wrapper:
        body[EVENT_WRAPPERS[doc["Event"]]] = {"List": listed}
    else:
        body["List"] = listed
    return json.dumps(body).encode()


def signed_query(
    body_encrypt: str | None = None,
    *,
    token: str = TOKEN,
    timestamp: int | None = None,
    nonce: str | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """A signed query; a fresh random nonce unless given (each signed query is accepted once)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(6)
    params = {"signature": sha1_sign(token, ts, nonce), "timestamp": ts, "nonce": nonce}
    if body_encrypt is not None:
        params["encrypt_type"] = "aes"
        params["msg_signature"] = sha1_sign(token, ts, nonce, body_encrypt)
    params.update(extra or {})
    return urlencode(params)


def safe_body(inner: bytes, fmt: str) -> tuple[bytes, str]:
    """A safe-mode body around `inner` (same format), and its Encrypt value."""
    encrypted = aes_encrypt(inner)
    if fmt == "xml":
        body = (
            f"<xml><ToUserName><![CDATA[{ORIGINAL_ID}]]></ToUserName>"
            f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
        ).encode()
    else:
        body = json.dumps({"ToUserName": ORIGINAL_ID, "Encrypt": encrypted}).encode()
    return body, encrypted
