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
  (`SubscribeMsgPopupEvent`, ...) or not. Bodies are hostile until proven otherwise: XML is read
  by defusedxml with any DTD or entity refused (in every encoding: expat reports the DOCTYPE
  whatever the bytes look like), both formats are bounded in size, element count and depth while
  they are read (linear time, so a push never holds the event loop for long), text must be
  storable and numbers ASCII digits within their column's range.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from scheduler.domain.storable import (
    EARLIEST,
    INT32_MAX,
    INT64_MAX,
    LATEST,
    ascii_int,
    text_problem,
)

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

# WeChat's pushes are a few hundred bytes, four levels deep, a dozen elements per template.
MAX_BODY_BYTES = 64 * 1024
MAX_ELEMENTS = 1000
MAX_DEPTH = 8
_CREATE_TIME_RANGE = (int(EARLIEST.timestamp()), int(LATEST.timestamp()) - 1)


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
    if len(body) > MAX_BODY_BYTES:
        raise PushError(413, "body_too_large", f"pushes are limited to {MAX_BODY_BYTES} bytes")
    fmt = fmt or detect_format(body)
    doc = _parse_json(body) if fmt == "json" else _parse_xml(body)
    if not isinstance(doc, dict):
        raise PushError(400, "malformed_body", f"the {fmt.upper()} body must be an object")
    return fmt, doc


def _malformed(reason: str) -> PushError:
    return PushError(400, "malformed_body", reason)


def _no_constant(name: str) -> float:
    raise _malformed(f"the JSON body has {name}, which is not a number WeChat sends")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _malformed(f"the JSON number {text[:40]} is out of range")
    return value


def _parse_json(body: bytes) -> Any:
    try:
        doc = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, PushError):
            raise
        raise _malformed(f"the JSON body does not parse: {exc}") from None
    # Walk it without recursion: bounded, and every text storable (jsonb keeps the raw push).
    count, pending = 0, [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_ELEMENTS or depth > MAX_DEPTH:
            raise _malformed(f"pushes are limited to {MAX_ELEMENTS} values, {MAX_DEPTH} deep")
        if isinstance(value, dict):
            for key, item in value.items():
                _storable(key)
                pending.append((item, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _storable(value)
    return doc


def _storable(text: str) -> None:
    if problem := text_problem(text):
        raise _malformed(f"a text in the body {problem}")


class _DictBuilder:
    """Builds the dict while expat reads the XML: bounded as it goes, linear, never recursive."""

    def __init__(self) -> None:
        self._open: list[tuple[str, dict[str, Any], list[str]]] = [("", {}, [])]
        self._count = 0

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self._count += 1
        if self._count > MAX_ELEMENTS or len(self._open) > MAX_DEPTH:
            raise _malformed(f"pushes are limited to {MAX_ELEMENTS} elements, {MAX_DEPTH} deep")
        self._open.append((tag, {}, []))

    def data(self, text: str) -> None:
        self._open[-1][2].append(text)

    def end(self, tag: str) -> None:
        _, children, texts = self._open.pop()
        value: Any = children or "".join(texts).strip()
        parent = self._open[-1][1]
        if tag == "List":  # a list even with one entry
            parent.setdefault("List", []).append(value)
        elif tag not in parent:
            parent[tag] = value
        elif isinstance(parent[tag], list):
            parent[tag].append(value)
        else:
            parent[tag] = [parent[tag], value]

    def close(self) -> Any:
        root = self._open[0][1]
        return next(iter(root.values()), {})


def _parse_xml(body: bytes) -> Any:
    parser = DefusedXMLParser(target=_DictBuilder(), forbid_dtd=True)
    try:
        parser.feed(body)
        return parser.close()
    except DefusedXmlException:
        raise _malformed("XML with a DOCTYPE or entities is not accepted") from None
    except ET.ParseError as exc:
        raise _malformed(f"the XML body does not parse: {exc}") from None


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
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        if required:
            raise PushError(400, "malformed_event", f"the event has no {name}")
        return ""
    if not isinstance(value, str):
        raise PushError(400, "malformed_event", f"{name} must be text")
    return value


def _number(
    doc: dict[str, Any], name: str, low: int, high: int, what: str, default: str | None = None
) -> int:
    text = _text(doc, name, required=default is None) or default or ""
    number = ascii_int(text, low, high)
    if number is None:
        raise PushError(
            400, "malformed_event", f"{name} must be {what}: ASCII digits from {low} to {high}"
        )
    return number


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
    base = PushEvent(
        event,
        _text(doc, "ToUserName", required=False),
        _text(doc, "FromUserName"),
        _number(doc, "CreateTime", *_CREATE_TIME_RANGE, "unix seconds"),
    )
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
        return replace(base, choices=tuple(choices))
    if event == SENT:
        reports = []
        for item in _items(doc, event):
            reports.append(
                SentReport(
                    _text(item, "TemplateId"),
                    _number(item, "MsgID", 0, INT64_MAX, "a message id"),
                    _number(item, "ErrorCode", -INT32_MAX - 1, INT32_MAX, "an errcode", "0"),
                    _text(item, "ErrorStatus", required=False) or None,
                )
            )
        return replace(base, sent=tuple(reports))
    return base
