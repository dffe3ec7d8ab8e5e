"""The WeChat channel: subscribe messages through the WeChat server API (wechat-api.md §1-3).

This is the one place that talks HTTP to WeChat, so every httpx (and aiohttp) exception and every
errcode is translated here into a `SendResult`; `send` never raises for a platform or network
error. What happens to each failure:

    errcode 0                         SENT (msgid kept when present)
    errcode 40001 / 40014 / 42001     drop the token, fetch one, retry once; then FAILED TOKEN
                                      (and for 30 s, until a send passes with the token fetched
                                      so, a send refused with it is FAILED TOKEN at once: the
                                      app's credentials are wrong, another fetch would not help)
    errcode -1 / 43108, HTTP 429,     not sent: retried with exponential backoff and jitter,
      a connection that never opened  `retries` attempts in all; then FAILED TRANSIENT
      (refused, DNS, connect timeout,
      no pooled connection free)
    a read timeout, a connection      UNKNOWN at once, never retried: the request may have
      broken after the request was    reached WeChat, which has no idempotency key
      written, HTTP 5xx without an    (REPLY_TIMEOUT, REPLY_LOST, SERVER_ERROR)
      errcode
    any other errcode                 FAILED at once, reason from `ERRCODE_REASONS`
                                      (WECHAT_ERROR when it is not in the table)
    token endpoint refuses us         FAILED TOKEN (bad appid/secret, IP not whitelisted...);
                                      every send for the next 30 s gets the same answer
                                      without asking again

The token endpoint is safe to call again, so its timeouts and breaks are retried as transient.

Access tokens come from `POST /cgi-bin/stable_token` in normal mode (never force_refresh, which
would kill the token of every other replica), are kept in memory and renewed 300 s before they
expire. Sends read the cached token without a lock; only a refresh takes the lock, so one fetch
serves every send waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from scheduler.channels.base import OutgoingMessage, Quota, SendResult
from scheduler.compact_json import encode as _encode
from scheduler.domain.outcomes import Outcome, Reason

__all__ = ["ERRCODE_REASONS", "WeChatChannel", "send_body"]

logger = logging.getLogger(__name__)

# What each send errcode means for the daemon. TOKEN codes are refreshed and retried once and
# TRANSIENT codes retried with backoff before they become final; the rest are final at once.
ERRCODE_REASONS: dict[int, Reason] = {
    -1: Reason.TRANSIENT,  # system busy
    40001: Reason.TOKEN,  # token invalid or not the latest
    40014: Reason.TOKEN,  # token malformed
    42001: Reason.TOKEN,  # token expired
    43108: Reason.TRANSIENT,  # concurrent sends to the same user
    43101: Reason.CONSENT_GONE,
    45009: Reason.QUOTA,
    40003: Reason.BAD_OPENID,
    40037: Reason.BAD_TEMPLATE,
    41030: Reason.BAD_PAGE,
    43107: Reason.TEMPLATE_BANNED,
    45168: Reason.SENSITIVE_CONTENT,
    47003: Reason.INVALID_DATA,
    41001: Reason.BAD_REQUEST,
    47001: Reason.BAD_REQUEST,
}

TOKEN_EARLY_RENEWAL_S = 300  # stable_token issues the next token only in the last 300 s
TOKEN_MIN_REUSE_S = 60
TOKEN_REFUSAL_HOLD_S = 30  # after stable_token refused the credentials, ask again after this

_JSON_HEADERS = {"Content-Type": "application/json"}
_encode_str = json.encoder.encode_basestring  # a str as JSON, as _encode writes it
_BODIES_MAX = 1024  # distinct (template, data) bodies remembered by a channel


class _Failure(Exception):
    """A failed attempt; becomes a FAILED SendResult at the `send` boundary unless retried."""

    def __init__(
        self, reason: Reason, errcode: int | None, detail: str, outcome: Outcome = Outcome.FAILED
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.errcode = errcode
        self.detail = detail
        self.outcome = outcome  # UNKNOWN: the request may have reached WeChat

    @property
    def transient(self) -> bool:
        return self.reason is Reason.TRANSIENT

    def copy(self) -> _Failure:
        return _Failure(self.reason, self.errcode, self.detail, self.outcome)

    def result(self) -> SendResult:
        return SendResult(self.outcome, self.reason, errcode=self.errcode, detail=self.detail)


class _WireTransport(AiohttpTransport):
    """httpx's aiohttp transport, with a way round httpx for the one request sent millions of
    times (wechat-api.md §1).

    Its session keeps no cookies (WeChat sets none). `post` is what `handle_async_request`
    does for a POST of a bytes body, minus building an httpx request and response around it:
    with httpx's client, those objects and their header conversions were half of a send's CPU.
    It asks aiohttp for the same request and maps every exception aiohttp raises to httpx's
    exactly as the stock transport does, so the channel's never-arrived / may-have-arrived
    classification reads the same exceptions on either path.
    """

    def __init__(self, limits: httpx.Limits, timeout: httpx.Timeout) -> None:
        super().__init__(limits=limits)
        self._json_headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        # httpx's timeouts as the stock transport turns a request's into aiohttp's.
        limit = timeout.as_dict()
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=limit["connect"], sock_read=limit["read"], connect=limit["pool"]
        )
        self._url_text = ""
        self._url = yarl.URL()

    def get_client(self) -> aiohttp.ClientSession:
        if self.client is not None:
            return super().get_client()
        limit = self.limits.max_connections
        connector = aiohttp.TCPConnector(
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
            limit=100 if limit is None else limit,  # aiohttp's default, as the stock transport
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def post(self, url: str, content: bytes) -> tuple[int, bytes]:
        """POST the JSON `content` to `url`: the status and the whole (decoded) body."""
        session = self.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self.client = self.get_client()
        if url is not self._url_text:  # one URL per token: parsed when the token changes
            self._url, self._url_text = yarl.URL(url), url
        with map_aiohttp_exceptions():
            async with session.request(
                "POST",
                self._url,
                headers=self._json_headers,
                data=content,
                allow_redirects=False,
                compress=False,
                timeout=self._timeout,
            ) as response:
                return response.status, await response.read()


def send_body(message: OutgoingMessage, *, miniprogram_state: str, lang: str) -> dict[str, Any]:
    """The JSON body of subscribe/send for `message` (wechat-api.md §1)."""
    body: dict[str, Any] = {
        "touser": message.touser,
        "template_id": message.template_id,
        "data": {key: {"value": value} for key, value in message.data.items()},
        "miniprogram_state": miniprogram_state,
        "lang": lang,
    }
    if message.page is not None:  # without page the card does not open the mini program
        body["page"] = message.page
    return body


class WeChatChannel:
    """The `Channel` for WeChat subscribe messages. Safe for many concurrent `send` calls."""

    def __init__(
        self,
        base_url: str,
        appid: str,
        secret: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        miniprogram_state: str = "formal",
        lang: str = "zh_CN",
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_connections: int = 256,
        client: httpx.AsyncClient | None = None,
        on_errcode: Callable[[int], None] | None = None,
    ) -> None:
        """`retries` counts attempts for a transient failure (1: no retry). The backoff before
        attempt n+1 is base * 2**(n-1) capped at `backoff_max`, half fixed and half random.
        `client` is used as given (and not closed); by default the channel sends through its
        own aiohttp transport with `max_connections` pooled connections."""
        self._on_errcode = on_errcode  # e.g. a metrics counter: sees every non-zero errcode
        self._base = base_url.rstrip("/")
        self._token_url = f"{self._base}/cgi-bin/stable_token"
        self._quota_url = f"{self._base}/cgi-bin/openapi/quota/get"
        self._appid = appid
        self._secret = secret
        self._timeout = httpx.Timeout(timeout)
        self._retries = max(retries, 1)
        self._miniprogram_state = miniprogram_state
        self._lang = lang
        # "Equal jitter": half the exponential step is fixed so retries of a busy server are
        # never back to back; the random half spreads many senders apart.
        self._wait: wait_base = wait_exponential(multiplier=backoff_base / 2, max=backoff_max / 2)
        self._wait += wait_random_exponential(multiplier=backoff_base / 2, max=backoff_max / 2)

        # A given client is used through its API (`post`) and not closed. Without one, the
        # channel's requests go straight to its own transport (`_WireTransport.post`): an httpx
        # client's auth, redirect, cookie and event-hook machinery and httpx's request and
        # response objects have nothing to do for the channel and cost as much as HTTP itself.
        self._client = client
        self._transport: _WireTransport | None = None
        if client is None:
            # httpx's own pool tops out around 320 sends/s; aiohttp's does not. Its connector
            # takes only max_connections (per host unlimited) and keepalive_expiry from Limits.
            limits = httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=30.0,
            )
            self._transport = _WireTransport(limits, self._timeout)
        self._bodies: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

        # (token, send URL with the token) and when to renew it; read without the lock.
        self._current: tuple[str, str] | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self._fetches_done = 0  # finished token fetches: a failure is shared with all who waited
        self._last_fetch_failure: _Failure | None = None
        self._last_fetch_at = 0.0
        # The token fetched because WeChat refused the one before, until a send passes with it:
        # refused too, it means the credentials, so it is not replaced (one refresh per app).
        self._unproven: tuple[str, float] | None = None  # (token, when fetched)

    async def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver one message: SENT, or FAILED with reason, errcode and errmsg; never raises
        for a WeChat or network error."""
        content = self._content(message)
        try:
            try:
                return await self._send_once(content)
            except _Failure as failure:
                if not failure.transient or self._retries == 1:
                    raise
                return await self._retry(content, failure)
        except _Failure as failure:
            logger.debug(
                "send failed",
                extra={"user": message.touser, "reason": failure.reason, "detail": failure.detail},
            )
            return failure.result()

    def _content(self, message: OutgoingMessage) -> bytes:
        """`send_body` as JSON bytes. A fan-out sends a few distinct texts to many users: the
        part of the body they share is encoded once and only the user and the page (which
        carries the delivery's id) per send (equal to encoding the whole: test_channel.py)."""
        key = (message.template_id, tuple(message.data.items()))
        shared = self._bodies.get(key)
        if shared is None:
            if len(self._bodies) >= _BODIES_MAX:
                self._bodies.clear()
            rest = send_body(
                OutgoingMessage("", message.template_id, message.data),
                miniprogram_state=self._miniprogram_state,
                lang=self._lang,
            )
            del rest["touser"]
            shared = self._bodies[key] = _encode(rest)[1:-1]
        page = "" if message.page is None else ',"page":' + _encode_str(message.page)
        return f'{{"touser":{_encode_str(message.touser)},{shared}{page}}}'.encode()

    async def _retry(self, content: bytes, first: _Failure) -> SendResult:
        """Attempts 2..retries with backoff after a transient failure of attempt 1.

        Only these sends pay for tenacity (~20 µs a call, about 6% of a send on loopback). Its
        first attempt replays the failure already seen, so its count and backoff cover all
        `retries` attempts.
        """
        replay: list[_Failure] = [first]

        async def attempt() -> SendResult:
            if replay:
                raise replay.pop()
            return await self._send_once(content)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retries),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, _Failure) and exc.transient),
            before_sleep=_log_retry,
            reraise=True,
        )
        return await retrying(attempt)

    async def quota(self) -> Quota | None:
        """What is left of the day's subscribe/send quota (POST /cgi-bin/openapi/quota/get,
        wechat-api.md §8); None when the account may not read it or WeChat cannot answer."""
        body = json.dumps({"cgi_path": "/cgi-bin/message/subscribe/send"}).encode()
        try:
            token, _ = await self._token()
            url = _with_token(self._quota_url, token)
            answer = await self._post(url, body, idempotent=True)
        except _Failure as failure:
            logger.debug("the send quota cannot be read: %s", failure.detail)
            return None
        quota = answer.get("quota")
        if answer.get("errcode", 0) != 0 or not isinstance(quota, dict):
            logger.debug("the send quota cannot be read: %s", answer)
            return None
        try:
            return Quota(int(quota["daily_limit"]), int(quota["used"]), int(quota["remain"]))
        except (KeyError, TypeError, ValueError):
            return None

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()

    # -- one attempt -------------------------------------------------------------------------

    async def _send_once(self, content: bytes) -> SendResult:
        token, url = await self._token()
        answer = await self._post(url, content)
        self._observe(answer)
        if _reason(answer) is Reason.TOKEN and not self._refused_again(token):
            # Expired, or replaced by a force_refresh elsewhere: one fresh token, one more try.
            self._drop_token(token)
            token, url = await self._token()
            if not self._refused_again(token):
                self._unproven = (token, time.monotonic())
            answer = await self._post(url, content)
            self._observe(answer)
        if self._unproven is not None and self._unproven[0] == token:
            if _reason(answer) not in (Reason.TOKEN, Reason.TRANSIENT):
                self._unproven = None  # WeChat took the fresh token
        return _result(answer)

    def _refused_again(self, token: str) -> bool:
        """Is `token` the one fetched after WeChat refused its predecessor, less than
        TOKEN_REFUSAL_HOLD_S ago, with no send passed since? Then its refusal is the app's."""
        unproven = self._unproven
        return (
            unproven is not None
            and unproven[0] == token
            and time.monotonic() - unproven[1] < TOKEN_REFUSAL_HOLD_S
        )

    def _observe(self, answer: dict[str, Any]) -> None:
        errcode = answer.get("errcode", 0)
        if self._on_errcode is not None and isinstance(errcode, int) and errcode:
            self._on_errcode(errcode)

    async def _post(self, url: str, content: bytes, *, idempotent: bool = False) -> dict[str, Any]:
        """POST JSON; return the JSON object answered or raise _Failure: transient when the
        request provably never arrived (or `idempotent`), UNKNOWN when it may have."""
        try:
            status, body = await self._request(url, content)
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if idempotent or _never_arrived(exc):
                raise _Failure(Reason.TRANSIENT, None, detail) from exc
            reason = Reason.REPLY_TIMEOUT if _timed_out(exc) else Reason.REPLY_LOST
            raise _Failure(reason, None, detail, Outcome.UNKNOWN) from exc
        except httpx.HTTPError as exc:
            raise _Failure(Reason.WECHAT_ERROR, None, f"{type(exc).__name__}: {exc}") from exc
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status == 429:  # throttled before it was handled
            raise _Failure(Reason.TRANSIENT, None, f"HTTP {status}")
        if status >= 500 and not (isinstance(answer, dict) and "errcode" in answer):
            if idempotent:
                raise _Failure(Reason.TRANSIENT, None, f"HTTP {status}")
            detail = f"HTTP {status} without an errcode: {_text(body)!r}"
            raise _Failure(Reason.SERVER_ERROR, None, detail, Outcome.UNKNOWN)
        if not isinstance(answer, dict) or (status != 200 and "errcode" not in answer):
            raise _Failure(Reason.WECHAT_ERROR, None, f"HTTP {status}: {_text(body)!r}")
        return answer

    async def _request(self, url: str, content: bytes) -> tuple[int, bytes]:
        """POST `content` to `url`: the status and body, or the transport's exception."""
        if self._transport is not None:
            return await self._transport.post(url, content)
        assert self._client is not None  # one or the other
        response = await self._client.post(
            url, content=content, headers=_JSON_HEADERS, timeout=self._timeout
        )
        return response.status_code, response.content

    # -- access token ------------------------------------------------------------------------

    async def _token(self) -> tuple[str, str]:
        current = self._current
        if current is not None and time.monotonic() < self._renew_at:
            return current  # the fast path: no lock
        return await self._refresh_token()

    async def _refresh_token(self) -> tuple[str, str]:
        fetches_before = self._fetches_done
        async with self._lock:
            current = self._current
            if current is not None and time.monotonic() < self._renew_at:
                return current  # someone else refreshed while we waited
            failure = self._last_fetch_failure
            if failure is not None and (
                self._fetches_done != fetches_before  # it failed while we waited
                or (  # the credentials were refused a moment ago: they are still wrong
                    failure.reason is Reason.TOKEN
                    and time.monotonic() - self._last_fetch_at < TOKEN_REFUSAL_HOLD_S
                )
            ):
                raise failure.copy()  # do not hammer the token endpoint
            self._last_fetch_failure = None
            try:
                token, expires_in = await self._fetch_token()
            except _Failure as failure:
                self._last_fetch_failure, self._last_fetch_at = failure, time.monotonic()
                raise
            finally:
                self._fetches_done += 1
            url = _with_token(f"{self._base}/cgi-bin/message/subscribe/send", token)
            self._current = (token, url)
            self._renew_at = time.monotonic() + max(
                expires_in - TOKEN_EARLY_RENEWAL_S, TOKEN_MIN_REUSE_S
            )
            logger.info("fetched a WeChat access token", extra={"expires_in": expires_in})
            return self._current

    async def _fetch_token(self) -> tuple[str, int]:
        payload = {
            "grant_type": "client_credential",
            "appid": self._appid,
            "secret": self._secret,
            "force_refresh": False,
        }
        answer = await self._post(self._token_url, json.dumps(payload).encode(), idempotent=True)
        token = answer.get("access_token")
        if isinstance(token, str) and token:
            expires_in = answer.get("expires_in")
            return token, expires_in if isinstance(expires_in, int) else 7200
        errcode = answer.get("errcode")
        detail = f"stable_token: {answer.get('errmsg', answer)}"
        if errcode == -1:
            raise _Failure(Reason.TRANSIENT, errcode, detail)
        logger.warning(
            "WeChat refused an access token", extra={"errcode": errcode, "detail": detail}
        )
        raise _Failure(Reason.TOKEN, errcode if isinstance(errcode, int) else None, detail)

    def _drop_token(self, token: str) -> None:
        # Only the token that failed: a concurrent send may already have fetched its successor.
        if self._current is not None and self._current[0] == token:
            self._current = None


def _result(answer: dict[str, Any]) -> SendResult:
    """The SendResult for a send's JSON answer; transient errcodes raise _Failure instead."""
    errcode = answer.get("errcode", 0)
    if errcode == 0:
        msgid = answer.get("msgid")
        return SendResult(Outcome.SENT, errcode=0, msgid=msgid if isinstance(msgid, int) else None)
    detail = str(answer.get("errmsg", ""))
    if not isinstance(errcode, int):
        return SendResult(Outcome.FAILED, Reason.WECHAT_ERROR, detail=f"errcode {errcode!r}")
    reason = ERRCODE_REASONS.get(errcode, Reason.WECHAT_ERROR)
    if reason is Reason.TRANSIENT:
        raise _Failure(reason, errcode, detail)
    return SendResult(Outcome.FAILED, reason, errcode=errcode, detail=detail)


def _with_token(url: str, token: str) -> str:
    return f"{url}?access_token={quote(token)}"


def _text(body: bytes) -> str:
    return body[:400].decode("utf-8", "replace")[:200]


def _never_arrived(exc: BaseException) -> bool:
    """True only for failures before the request could be written: the connection was never
    opened (refused, DNS, TLS, connect timeout) or no pooled connection came free. httpx's aiohttp
    transport maps every aiohttp connection error to ConnectTimeout, so its cause decides."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError) or isinstance(exc, aiohttp.ClientError):
        origin = cause if isinstance(cause, aiohttp.ClientError) else exc
        return isinstance(origin, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _timed_out(exc: BaseException) -> bool:
    origin = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    return isinstance(origin, httpx.TimeoutException | TimeoutError)


def _reason(answer: dict[str, Any]) -> Reason | None:
    errcode = answer.get("errcode", 0)
    return ERRCODE_REASONS.get(errcode) if isinstance(errcode, int) else None


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    logger.debug("retrying a send: %s", failure, extra={"attempt": state.attempt_number})
