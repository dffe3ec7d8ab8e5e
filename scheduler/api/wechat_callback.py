"""WeChat's message push (wechat-api.md §6): the URL check and the subscribe events.

Authenticated by its signature alone (no API token). A valid push is answered `success` as plain
text, so WeChat does not retry; WeChat's retries of an event carry the same stable event id and
are applied once. A request too old (its signed `timestamp` more than `MAX_AGE_S` away from now)
is refused as a replay, even when its signature is right, and so is a signed query (timestamp,
nonce, signature) any replica already accepted. `REMINDERS_WECHAT_PUSH_MODE` says what the
console sends: in safe mode only encrypted pushes with a valid `msg_signature` count (the plain
`signature` does not cover the body); in compatible mode the encrypted part, when present.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from scheduler.api.app import ApiError
from scheduler.channels import wechat_push as push
from scheduler.domain.consent import Result, Via
from scheduler.domain.enrolment import OPENID
from scheduler.domain.plan import ConsentKind
from scheduler.domain.storable import INT64_MAX, ascii_int, text_problem
from scheduler.settings import Settings
from scheduler.store.consent import ConsentReport, ConsentStore, SentResult

log = logging.getLogger(__name__)

router = APIRouter(tags=["wechat"])

MAX_AGE_S = 300
# A signed query is remembered while its timestamp could still pass as fresh (plus clock skew).
REPLAY_KEEP_S = 2 * MAX_AGE_S + 60
MAX_PARAM = 128  # WeChat's query values are a few dozen characters
SOURCE = "wechat:callback"


def _not_configured(message: str) -> ApiError:
    """The one 503: the callback's settings, not the push, are what is wrong."""
    return ApiError(503, "callback_not_configured", message)


def _token(settings: Settings) -> str:
    if settings.wechat_callback_token is None:
        raise _not_configured(
            "set REMINDERS_WECHAT_CALLBACK_TOKEN to the Token of the message-push settings"
        )
    return settings.wechat_callback_token.get_secret_value()


def _aes_key(settings: Settings) -> bytes:
    secret = settings.wechat_encoding_aes_key
    assert secret is not None  # compatible and safe mode need one: Settings checks
    try:
        return push.aes_key(secret.get_secret_value())
    except ValueError as exc:
        raise _not_configured(str(exc)) from None


def _malformed_query(**params: str | None) -> None:
    for name, value in params.items():
        if value is not None and (len(value) > MAX_PARAM or text_problem(value)):
            raise ApiError(
                400,
                "malformed_request",
                f"{name} is not a value WeChat sends (text of at most {MAX_PARAM} characters)",
            )


def _check(
    settings: Settings, signature: str | None, timestamp: str, nonce: str
) -> tuple[str, int]:
    """The Token and the signed timestamp, once the signature and its freshness are right."""
    token = _token(settings)
    if not signature or not timestamp or not nonce:
        raise ApiError(401, "unauthenticated", "signature, timestamp and nonce are required")
    if not push.signature_ok(signature, token, timestamp, nonce):
        raise ApiError(403, "bad_signature", "the signature does not match the configured Token")
    seconds = ascii_int(timestamp, 0, INT64_MAX)
    if seconds is None:
        raise ApiError(400, "malformed_request", "timestamp must be unix seconds (ASCII digits)")
    if abs(time.time() - seconds) > MAX_AGE_S:
        raise ApiError(
            403,
            "stale_request",
            f"timestamp is more than {MAX_AGE_S} s from now: a replay, or a clock is wrong",
        )
    return token, seconds


Signed = Annotated[str | None, Query()]


@router.get(
    "/wechat/callback",
    summary="URL verification: answers echostr when the signature is right",
    response_class=PlainTextResponse,
)
async def verify(
    request: Request,
    echostr: Annotated[str, Query()],
    signature: Signed = None,
    timestamp: Signed = None,
    nonce: Signed = None,
) -> PlainTextResponse:
    _malformed_query(echostr=echostr, signature=signature, timestamp=timestamp, nonce=nonce)
    _check(request.app.state.settings, signature, timestamp or "", nonce or "")
    return PlainTextResponse(echostr)


@router.post(
    "/wechat/callback",
    summary="Subscribe-message events pushed by WeChat (plaintext or safe mode, XML or JSON)",
    response_class=PlainTextResponse,
)
async def receive(
    request: Request,
    signature: Signed = None,
    timestamp: Signed = None,
    nonce: Signed = None,
    encrypt_type: Signed = None,
    msg_signature: Signed = None,
) -> PlainTextResponse:
    settings: Settings = request.app.state.settings
    _malformed_query(
        signature=signature,
        timestamp=timestamp,
        nonce=nonce,
        encrypt_type=encrypt_type,
        msg_signature=msg_signature,
    )
    token, seconds = _check(settings, signature, timestamp or "", nonce or "")
    body = await request.body()
    try:
        fmt, doc = push.parse_document(body)
        sealed = push.envelope(doc, fmt)
        encrypted = encrypt_type == "aes" or bool(msg_signature) or sealed is not None
        if settings.push_mode == "safe" and not (encrypt_type == "aes" and msg_signature):
            # `signature` does not cover the body: only msg_signature proves it is WeChat's.
            raise push.PushError(
                403,
                "encryption_required",
                "the message push is in safe mode: only encrypted pushes with a valid "
                "msg_signature are accepted",
            )
        if encrypted:  # in compatible mode too, the encrypted part is what counts
            if settings.push_mode == "plaintext":
                raise _not_configured(
                    "the push is encrypted: set REMINDERS_WECHAT_PUSH_MODE and "
                    "REMINDERS_WECHAT_ENCODING_AES_KEY as in the message-push settings"
                )
            if sealed is None:
                raise push.PushError(400, "malformed_body", "safe mode needs an Encrypt field")
            if not push.signature_ok(
                msg_signature, token, timestamp or "", nonce or "", sealed.encrypt
            ):
                raise push.PushError(
                    403, "bad_signature", "msg_signature does not match the Token and Encrypt"
                )
            inner = push.decrypt(_aes_key(settings), sealed.encrypt, settings.wechat_appid)
            fmt, doc = push.parse_document(inner, push.detect_format(inner))
        event = push.parse_event(doc)
        if event.event in (push.POPUP, push.CHANGE, push.SENT) and not OPENID.match(
            event.from_user
        ):
            raise push.PushError(400, "malformed_event", "FromUserName is not an openid")
    except push.PushError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None

    store = request.app.state.store.consent
    signed = (seconds, nonce or "", (signature or "").lower())
    if not await store.first_use(*signed, keep_s=REPLAY_KEEP_S):
        raise ApiError(
            403,
            "replayed_request",
            "this timestamp, nonce and signature were already used: each push is accepted once",
        )
    try:
        await _apply(store, event, doc)
    except Exception:
        await store.forget_use(*signed)  # not applied: WeChat's retry must not be a replay
        raise
    return PlainTextResponse("success")


async def _apply(store: ConsentStore, event: push.PushEvent, doc: dict[str, Any]) -> None:
    if event.event in (push.POPUP, push.CHANGE):
        await _consent(store, event, doc)
    elif event.event == push.SENT:
        matched = await store.apply_sent_results(
            [
                SentResult(s.msgid, s.error_code, s.error_status, event.from_user, s.template_id)
                for s in event.sent
            ]
        )
        if matched < len(event.sent):
            log.info("sent event: %d of %d msgids matched", matched, len(event.sent))
    else:
        log.debug("ignored pushed event %r", event.event)


async def _consent(store: ConsentStore, event: push.PushEvent, doc: dict[str, Any]) -> None:
    kinds = await store.template_kinds()
    via = Via.SETTINGS if event.event == push.CHANGE else Via.POPUP
    reports = []
    for choice in event.choices:
        declared = kinds.get(choice.template_id, set())
        kind: ConsentKind | None = next(iter(declared)) if len(declared) == 1 else None
        reports.append(
            ConsentReport(
                user_id=event.from_user,
                template_id=choice.template_id,
                result=Result(choice.status),
                source=SOURCE,
                kind=kind,
                via=via,
                occurred_at=datetime.fromtimestamp(event.create_time, UTC),
                event_id=event.event_id(choice.template_id),
                raw=doc,
            )
        )
    recorded = await store.record(reports)
    log.info(
        "%s from %s: %d recorded, %d duplicate(s)",
        event.event,
        event.from_user,
        recorded.appended,
        recorded.duplicates,
        extra={"user": event.from_user},
    )
