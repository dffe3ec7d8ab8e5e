"""WeChat's message push (wechat-api.md §6): signatures, safe-mode AES, event parsing. Pure.

Everything here works on bytes and strings; the HTTP route (`scheduler.api.wechat_callback`) and
the store do the I/O. Problems are `PushError`s carrying an HTTP status, a code and a reason a
developer can act on.

- Signature: sha1 of the sorted, concatenated [token, timestamp, nonce] (plus `Encrypt` for the
  `msg_signature` of safe mode), compared in constant time.
- Safe mode: AES-256-CBC, key = base64(EncodingAESKey + "="), IV = the key's first 16 bytes,
  PKCS#7 padding to 32-byte blocks; the plaintext is 16 random bytes, a 4-byte big-endian length,
  the message, then the appid.
- Bodies: XML or JSON; `List` as one object or an array; inside a per-event wrapper element
  (`SubscribeMsgPopupEvent`, ...) or not. XML with a DOCTYPE is refused outright: WeChat never
  sends one, and refusing it rules out entity tricks without a dependency (defusedxml).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 32  # WeChat pads to 32 bytes, not AES's 16

POPUP = "subscribe_msg_popup_event"
CHANGE = "subscribe_msg_change_event"
SENT = "subscribe_msg_sent_event"
_WRAPPERS = {
    POPUP: "SubscribeMsgPopupEvent",
    CHANGE: "SubscribeMsgChangeEvent",
    SENT: "SubscribeMsgSentEvent",
}

Format = Literal["xml", "json"]


class PushError(Exception):
    """A push we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- signatures ---------------------------------------------------------------------------------


def signature(token: str, timestamp: str, nonce: str, *extra: str) -> str:
    """sha1 hex of the sorted, concatenated parts (the `signature` / `msg_signature` rule)."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, *extra])).encode()).hexdigest()


def signature_ok(
    presented: str | None, token: str, timestamp: str, nonce: str, *extra: str
) -> bool:
    if not presented:
        return False
    expected = signature(token, timestamp, nonce, *extra)
    return hmac.compare_digest(expected.encode(), presented.lower().encode())


# --- safe mode (AES) ----------------------------------------------------------------------------


def aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte key from the 43-character EncodingAESKey of the push settings."""
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(encoding_aes_key) != 43 or len(key) != 32:
        raise ValueError("the EncodingAESKey must be the 43 characters shown in the push settings")
    return key


def encrypt(key: bytes, message: bytes, appid: str, random16: bytes | None = None) -> str:
    """What WeChat puts in `Encrypt` (used by tests and by encrypted replies)."""
    plain = (random16 or os.urandom(16)) + struct.pack(">I", len(message)) + message
    plain += appid.encode()
    pad = BLOCK - len(plain) % BLOCK
    plain += bytes([pad]) * pad
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


def decrypt(key: bytes, encrypted: str, appid: str | None) -> bytes:
    """The message inside `Encrypt`; checks the padding, the length and (when given) the appid."""
    try:
        data = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError):
        raise PushError(400, "bad_ciphertext", "Encrypt is not base64") from None
    if not data or len(data) % 16:
        raise PushError(400, "bad_ciphertext", "Encrypt is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = decryptor.update(data) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
        raise PushError(
            400, "bad_ciphertext", "Encrypt does not decrypt (check the EncodingAESKey)"
        )
    plain = plain[:-pad]
    if len(plain) < 20:
        raise PushError(400, "bad_ciphertext", "the decrypted message is too short")
    (length,) = struct.unpack(">I", plain[16:20])
    message, sender = plain[20 : 20 + length], plain[20 + length :]
    if len(message) != length:
        raise PushError(400, "bad_ciphertext", "the decrypted message length does not match")
    if appid is not None and sender.decode(errors="replace") != appid:
        raise PushError(
            403, "wrong_appid", "the message was encrypted for another appid than wechat_appid"
        )
    return message


# --- bodies -------------------------------------------------------------------------------------


def detect_format(body: bytes) -> Format:
    head = body.lstrip()[:1]
    if head == b"<":
        return "xml"
    if head in (b"{", b"["):
        return "json"
    raise PushError(400, "malformed_body", "the body is neither XML nor JSON")


def parse_document(body: bytes, fmt: Format | None = None) -> tuple[Format, dict[str, Any]]:
    """The body as a dict (XML elements become keys; repeated elements become lists)."""
    fmt = fmt or detect_format(body)
    if fmt == "json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PushError(400, "malformed_body", f"the JSON body does not parse: {exc}") from None
        if not isinstance(doc, dict):
            raise PushError(400, "malformed_body", "the JSON body must be an object")
        return fmt, doc
    upper = body.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise PushError(400, "malformed_body", "XML with a DOCTYPE or entities is not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise PushError(400, "malformed_body", f"the XML body does not parse: {exc}") from None
    value = _element(root)
    return fmt, value if isinstance(value, dict) else {}


def _element(element: ET.Element) -> dict[str, Any] | str:
    children = list(element)
    if not children:
        return (element.text or "").strip()
    out: dict[str, Any] = {}
    for child in children:
        value = _element(child)
        if child.tag == "List":  # a list even with one entry
            out.setdefault("List", []).append(value)
        elif child.tag in out:
            previous = out[child.tag]
            out[child.tag] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[child.tag] = value
    return out


@dataclass(frozen=True, slots=True)
class Envelope:
    """A safe-mode body: the ciphertext (and the format it came in)."""

    format: Format
    encrypt: str


def envelope(doc: dict[str, Any], fmt: Format) -> Envelope | None:
    value = doc.get("Encrypt")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PushError(400, "malformed_body", "Encrypt must be a non-empty string")
    return Envelope(fmt, value)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateChoice:
    template_id: str
    status: str  # accept / reject (popup), reject (change)
    popup_scene: str | None = None


@dataclass(frozen=True, slots=True)
class SentReport:
    template_id: str
    msgid: int
    error_code: int
    error_status: str | None


@dataclass(frozen=True, slots=True)
class PushEvent:
    event: str  # the Event field; only POPUP, CHANGE and SENT carry items
    to_user: str
    from_user: str
    create_time: int
    choices: tuple[TemplateChoice, ...] = ()
    sent: tuple[SentReport, ...] = ()

    def event_id(self, template_id: str) -> str:
        """A stable id for one template's entry: WeChat's retries carry the same one."""
        return f"wx:{self.event}:{self.from_user}:{self.create_time}:{template_id}"


def _text(doc: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = doc.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(int(value))
    if value is None or value == "":
        if required:
            raise PushError(400, "malformed_event", f"the event has no {name}")
        return ""
    if not isinstance(value, str):
        raise PushError(400, "malformed_event", f"{name} must be text")
    return value


def _items(doc: dict[str, Any], event: str) -> list[dict[str, Any]]:
    holder = doc
    wrapper = doc.get(_WRAPPERS.get(event, ""))
    if "List" not in doc and isinstance(wrapper, dict):
        holder = wrapper
    items = holder.get("List")
    if items is None:
        raise PushError(400, "malformed_event", f"the {event} has no List")
    items = items if isinstance(items, list) else [items]
    if not items or not all(isinstance(i, dict) for i in items):
        raise PushError(400, "malformed_event", "each List entry must be an object")
    return items


def parse_event(doc: dict[str, Any]) -> PushEvent:
    """One pushed message as a `PushEvent` (events other than subscribe events: no items)."""
    msg_type = _text(doc, "MsgType", required=False)
    event = _text(doc, "Event", required=msg_type == "event")
    created = _text(doc, "CreateTime")
    if not created.isdigit():
        raise PushError(400, "malformed_event", "CreateTime must be unix seconds")
    base = {
        "event": event,
        "to_user": _text(doc, "ToUserName", required=False),
        "from_user": _text(doc, "FromUserName"),
        "create_time": int(created),
    }
    if event in (POPUP, CHANGE):
        choices = []
        for item in _items(doc, event):
            status = _text(item, "SubscribeStatusString")
            if status not in ("accept", "reject"):
                raise PushError(
                    400, "malformed_event", f"SubscribeStatusString {status!r} is not accept/reject"
                )
            choices.append(
                TemplateChoice(
                    _text(item, "TemplateId"),
                    status,
                    _text(item, "PopupScene", required=False) or None,
                )
            )
        return PushEvent(**base, choices=tuple(choices))
    if event == SENT:
        reports = []
        for item in _items(doc, event):
            msgid, code = _text(item, "MsgID"), _text(item, "ErrorCode", required=False) or "0"
            if not msgid.isdigit() or not code.lstrip("-").isdigit():
                raise PushError(400, "malformed_event", "MsgID and ErrorCode must be numbers")
            reports.append(
                SentReport(
                    _text(item, "TemplateId"),
                    int(msgid),
                    int(code),
                    _text(item, "ErrorStatus", required=False) or None,
                )
            )
        return PushEvent(**base, sent=tuple(reports))
    return PushEvent(**base)
