"""A fake WeChat server API over real HTTP, for tests, demos and benchmarks.

It speaks the real paths and rules of wechat-api.md §1-4 closely enough that the WeChat channel
cannot tell it from the real thing on the happy path and on the errors that matter:

- `POST /cgi-bin/stable_token`: normal mode returns the same token while it has more than 300 s
  left, then issues a new one (the old one lives out its time, so they overlap);
  `force_refresh` invalidates the current one at once.
- `GET /cgi-bin/token`: every call issues a new token; the previous one stays valid 300 s more.
- `POST /cgi-bin/message/subscribe/send`: 41001/40001/42001 for a missing/unknown/expired token,
  47001 for a body that is not a JSON object or lacks a field, 47003 (naming the field) for a bad
  `data`, 40037 for a template the registry does not know, 43101 when `check_consent` is on and
  the user has no credit, 43107 on a banned template (`ban_template`), 45009 once `daily_quota`
  sends were accepted; otherwise `{"errcode":0,"errmsg":"ok","msgid":...}`.
- `POST /cgi-bin/openapi/quota/get`: the quota of subscribe/send (`daily_limit`, `used`,
  `remain`), or 48001 when `quota_readable` is off.

Control endpoints under `/fake/` (and the same methods on `FakeWeChat`) let a test or another
process read what was sent, grant or revoke consent, inject faults (errcodes, HTTP statuses,
latency, and messages accepted whose reply is then delayed or dropped) and expire tokens.

Requests are not logged: this server is the target of throughput benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from scheduler.domain.template_fields import check_value, field_type

__all__ = ["FakeWeChat", "serve"]

logger = logging.getLogger(__name__)

TOKEN_OVERLAP_S = 300.0  # how long an old token keeps working after a new one is issued

ERRMSGS: dict[int, str] = {
    -1: "system error",
    0: "ok",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40013: "invalid appid",
    40014: "invalid access_token",
    40037: "invalid template_id",
    40125: "invalid appsecret",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    41030: "invalid page",
    42001: "access_token expired",
    43101: "user refuse to accept the msg",
    43107: "subscribe message capability banned",
    43108: "concurrent limit",
    45009: "reach max api daily quota limit",
    45168: "sensitive words",
    47001: "data format error",
    47003: "argument invalid!",
}

Kind = Literal["one_time", "long_term"]


@dataclass(slots=True)
class _Token:
    appid: str
    expires_at: float  # on the fake's clock


Reply = Literal["normal", "delay", "drop"]


@dataclass(frozen=True, slots=True)
class _Fault:
    errcode: int | None
    http_status: int | None
    latency_s: float
    reply: Reply = "normal"  # delay/drop: the message is accepted, then its reply is late/lost


DEFAULT_DAILY_QUOTA = 10_000_000  # a mini program without WeChat Pay (wechat-api.md §8)


class FakeWeChat:
    """An in-process fake of the WeChat server API; `start()` serves it on a real socket."""

    def __init__(
        self,
        *,
        appid: str | None = None,
        secret: str | None = None,
        token_lifetime_s: int = 7200,
        check_consent: bool = False,
        templates: dict[str, list[str]] | None = None,
        keep_messages: bool = True,
        log_messages: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`appid`/`secret` None accept any. `templates` maps template id -> keyword keys; when
        given, unknown templates and missing or extra keys are refused. `clock` drives token
        lifetimes (pass a fake one to test expiry). `keep_messages=False` only counts sends."""
        self.appid = appid
        self.secret = secret
        self.token_lifetime_s = token_lifetime_s
        self.check_consent = check_consent
        self.templates = templates
        self.keep_messages = keep_messages
        self._value_verdicts: dict[tuple[str, str], bool] = {}
        self.log_messages = log_messages  # the demo shows each message it receives
        self.clock = clock

        self.messages: list[dict[str, Any]] = []
        self._tokens: dict[str, _Token] = {}
        self._stable_current: dict[str, str] = {}  # appid -> its current stable token
        self._plain_current: dict[str, str] = {}  # appid -> its latest /cgi-bin/token token
        self._credits: Counter[tuple[str, str]] = Counter()  # (openid, template) -> one-time
        self._long_term: set[tuple[str, str]] = set()
        self._banned: dict[str, int] = {}  # template -> sends it still accepts before the ban
        # WeChat's daily send quota: 45009 once `used` reaches it; the quota API reports it.
        self.daily_quota = DEFAULT_DAILY_QUOTA
        self.quota_used = 0
        self.quota_readable = True  # False: the quota API answers 48001 (not for this account)
        self._faults: deque[_Fault] = deque()
        self._token_faults: deque[tuple[int, float]] = deque()  # (errcode, latency_s)
        self._lost_replies: tuple[float, Reply, float] = (0.0, "normal", 0.0)
        self._random = random.Random(0)
        self.replies_lost = 0  # accepted messages whose reply was delayed or dropped
        self._errcodes: Counter[int] = Counter()
        self._http_statuses: Counter[int] = Counter()
        self._token_calls: Counter[str] = Counter()
        self._msgids = itertools.count(secrets.randbits(60) | 1 << 61)
        self._rid_prefix = secrets.token_hex(4)
        self._rids = itertools.count()
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/cgi-bin/stable_token", self._stable_token),
                web.get("/cgi-bin/token", self._plain_token),
                web.post("/cgi-bin/message/subscribe/send", self._send),
                web.post("/cgi-bin/openapi/quota/get", self._quota_get),
                web.get("/fake/messages", self._get_messages),
                web.delete("/fake/messages", self._clear_messages),
                web.post("/fake/grant", self._post_grant),
                web.post("/fake/revoke", self._post_revoke),
                web.post("/fake/inject", self._post_inject),
                web.post("/fake/lose-replies", self._post_lose_replies),
                web.post("/fake/expire-tokens", self._post_expire_tokens),
                web.get("/fake/stats", self._get_stats),
            ]
        )
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: any free port) and return the base URL."""
        # access_log=None: no per-request log line, even at DEBUG.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        sockets = self._runner.addresses
        bound_host, bound_port = sockets[0][0], sockets[0][1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- in-process helpers ------------------------------------------------------------------

    def grant(self, openid: str, template_id: str, kind: Kind = "one_time", count: int = 1) -> None:
        """Record a user's acceptance: `count` one-time credits, or a long-term grant."""
        if kind == "long_term":
            self._long_term.add((openid, template_id))
        elif kind == "one_time":
            self._credits[(openid, template_id)] += count
        else:
            raise ValueError(f"unknown grant kind {kind!r}")

    def revoke(self, openid: str, template_id: str, kind: Kind | None = None) -> None:
        """The user turns the template off: drop its credits and/or long-term grant (both when
        `kind` is None; turning a template off also wipes stored one-time credits)."""
        if kind in (None, "one_time"):
            self._credits.pop((openid, template_id), None)
        if kind in (None, "long_term"):
            self._long_term.discard((openid, template_id))

    def credits(self, openid: str, template_id: str) -> int:
        """One-time credits left for (openid, template): the number WeChat will not tell you."""
        return self._credits[(openid, template_id)]

    def inject(
        self,
        errcodes: Iterable[int] = (),
        http_status: int | None = None,
        latency_s: float = 0.0,
        times: int = 1,
    ) -> None:
        """Queue faults for the next send calls, in order, `times` over.

        Each errcode answers one call with that errcode (before any token or body check). With
        `http_status` the call gets that status and a non-JSON page instead. With neither, the
        call is only delayed by `latency_s` and then handled normally.
        """
        codes: list[int | None] = list(errcodes) or [None]
        for _ in range(times):
            for code in codes:
                self._faults.append(_Fault(code, http_status, latency_s))

    def inject_token_errors(
        self, errcode: int = -1, *, latency_s: float = 0.0, times: int = 1
    ) -> None:
        """The next `times` token calls answer `errcode` (-1: WeChat is busy) after
        `latency_s`, whatever the credentials."""
        for _ in range(times):
            self._token_faults.append((errcode, latency_s))

    async def _token_fault(self) -> web.Response | None:
        if not self._token_faults:
            return None
        errcode, latency_s = self._token_faults.popleft()
        await asyncio.sleep(latency_s)
        return self._error(errcode)

    def ban_template(self, template_id: str, *, after_sends: int = 0) -> None:
        """Ban a template (or the account's use of it) as WeChat does: after `after_sends` more
        accepted sends, every send on it gets 43107."""
        self._banned[template_id] = after_sends

    def inject_lost_replies(
        self, times: int = 1, *, reply: Reply = "drop", latency_s: float = 0.0
    ) -> None:
        """The next `times` sends are accepted and recorded (the user gets the message), then
        their reply is dropped (the connection closed) or delayed by `latency_s`."""
        for _ in range(times):
            self._faults.append(_Fault(None, None, latency_s, reply))

    def lose_replies(
        self, rate: float, *, reply: Reply = "delay", latency_s: float = 30.0, seed: int = 0
    ) -> None:
        """From now on a fraction `rate` of accepted sends get their reply delayed by
        `latency_s` (past a client's timeout) or dropped; rate 0 turns it off."""
        self._lost_replies = (rate, reply, latency_s)
        self._random = random.Random(seed)

    def expire_tokens(self) -> None:
        """Make every token issued so far expired (sends with them get 42001)."""
        now = self.clock()
        for token in self._tokens.values():
            token.expires_at = min(token.expires_at, now)

    def stats(self) -> dict[str, Any]:
        """Counts of send responses by errcode and HTTP status, and of token calls."""
        return {
            "sends": sum(self._errcodes.values()) + sum(self._http_statuses.values()),
            "errcodes": {str(code): n for code, n in sorted(self._errcodes.items())},
            "http_statuses": {str(code): n for code, n in sorted(self._http_statuses.items())},
            "token_calls": dict(self._token_calls),
            "messages": len(self.messages),
            "replies_lost": self.replies_lost,
        }

    # -- tokens ------------------------------------------------------------------------------

    def _issue(self, appid: str) -> str:
        token = secrets.token_urlsafe(96)  # real tokens are ~136 chars
        self._tokens[token] = _Token(appid, self.clock() + self.token_lifetime_s)
        return token

    def _token_answer(self, token: str) -> web.Response:
        left = max(int(self._tokens[token].expires_at - self.clock()), 0)
        return web.json_response({"access_token": token, "expires_in": left})

    def _credentials_error(self, grant_type: object, appid: object, secret: object) -> int:
        if grant_type != "client_credential":
            return 40002
        if not isinstance(appid, str) or not appid:
            return 41002
        if not isinstance(secret, str) or not secret:
            return 41004
        if self.appid is not None and appid != self.appid:
            return 40013
        if self.secret is not None and secret != self.secret:
            return 40125
        return 0

    async def _stable_token(self, request: web.Request) -> web.Response:
        self._token_calls["stable_token"] += 1
        if (fault := await self._token_fault()) is not None:
            return fault
        body = await _json_object(request)
        if body is None:
            return self._error(47001, "data format error, POST a JSON object")
        appid, secret = body.get("appid"), body.get("secret")
        errcode = self._credentials_error(body.get("grant_type"), appid, secret)
        if errcode:
            return self._error(errcode)
        assert isinstance(appid, str)
        now = self.clock()
        current = self._stable_current.get(appid)
        if body.get("force_refresh") is True:
            if current is not None:
                self._tokens.pop(current, None)
        elif current is not None and current in self._tokens:
            if self._tokens[current].expires_at - now > TOKEN_OVERLAP_S:
                return self._token_answer(current)
            # In its last 300 s: issue a new one; the old one lives out its time.
        token = self._issue(appid)
        self._stable_current[appid] = token
        return self._token_answer(token)

    async def _plain_token(self, request: web.Request) -> web.Response:
        self._token_calls["token"] += 1
        if (fault := await self._token_fault()) is not None:
            return fault
        query = request.query
        appid, secret = query.get("appid"), query.get("secret")
        errcode = self._credentials_error(query.get("grant_type"), appid, secret)
        if errcode:
            return self._error(errcode)
        assert appid is not None
        previous = self._plain_current.get(appid)
        if previous is not None and previous in self._tokens:
            old = self._tokens[previous]
            old.expires_at = min(old.expires_at, self.clock() + TOKEN_OVERLAP_S)
        token = self._issue(appid)
        self._plain_current[appid] = token
        return self._token_answer(token)

    # -- send --------------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        fault = self._faults.popleft() if self._faults else None
        if (
            fault is None
            and self._lost_replies[0]
            and self._random.random() < self._lost_replies[0]
        ):
            _, reply, latency_s = self._lost_replies
            fault = _Fault(None, None, latency_s, reply)
        if fault is not None and fault.reply != "normal":
            response = await self._accept(request)
            self.replies_lost += 1
            if fault.reply == "drop":
                if request.transport is not None:
                    request.transport.close()  # no reply: the client sees the connection break
                return response
            await asyncio.sleep(fault.latency_s)
            return response
        if fault is not None:
            if fault.latency_s:
                await asyncio.sleep(fault.latency_s)
            if fault.http_status is not None:
                self._http_statuses[fault.http_status] += 1
                return web.Response(status=fault.http_status, text="fault injected")
            if fault.errcode is not None:
                return self._send_error(fault.errcode)
        return await self._accept(request)

    async def _accept(self, request: web.Request) -> web.Response:
        token = request.query.get("access_token")
        if not token:
            return self._send_error(41001)
        known = self._tokens.get(token)
        if known is None:
            return self._send_error(40001)
        if known.expires_at <= self.clock():
            return self._send_error(42001)

        body = await _json_object(request)
        if body is None:
            return self._send_error(47001, "data format error, the body is not a JSON object")
        touser, template_id, data = body.get("touser"), body.get("template_id"), body.get("data")
        for name, value in (("touser", touser), ("template_id", template_id), ("data", data)):
            if value is None:
                return self._send_error(47001, f"data format error, missing {name}")
        if not isinstance(touser, str) or not touser:
            return self._send_error(40003)
        if not isinstance(template_id, str) or not template_id:
            return self._send_error(40037)
        if self.templates is not None and template_id not in self.templates:
            return self._send_error(40037)
        if template_id in self._banned:
            if self._banned[template_id] <= 0:
                return self._send_error(43107)
            self._banned[template_id] -= 1
        if not isinstance(data, dict) or not data:
            # A JSON-encoded string instead of an object: what real WeChat says (community).
            return self._send_error(47003, "argument invalid! data is empty")

        values, problem = self._check_data(template_id, data)
        if problem is not None:
            return self._send_error(47003, problem)

        key = (touser, template_id)
        if self.check_consent and key not in self._long_term:
            if self._credits[key] <= 0:
                return self._send_error(43101)
            self._credits[key] -= 1

        if self.quota_used >= self.daily_quota:
            return self._send_error(45009)
        self.quota_used += 1
        msgid = next(self._msgids)
        if self.keep_messages:
            self.messages.append(
                {
                    "touser": touser,
                    "template_id": template_id,
                    "page": body.get("page"),
                    "data": values,
                    "miniprogram_state": body.get("miniprogram_state"),
                    "lang": body.get("lang"),
                    "msgid": msgid,
                    "received_at": time.time(),
                }
            )
        if self.log_messages:
            logger.info("fake WeChat received for %s (%s): %s", touser, template_id, values)
        self._errcodes[0] += 1
        return web.Response(body=_SENT % msgid, content_type="application/json")

    async def _quota_get(self, request: web.Request) -> web.Response:
        known = self._tokens.get(request.query.get("access_token", ""))
        if known is None or known.expires_at <= self.clock():
            return self._error(40001)
        body = await _json_object(request)
        if body is None or body.get("cgi_path") != "/cgi-bin/message/subscribe/send":
            return self._error(76021, "cgi_path not found")
        if not self.quota_readable:
            return self._error(48001, "api unauthorized")
        remain = max(self.daily_quota - self.quota_used, 0)
        quota = {"daily_limit": self.daily_quota, "used": self.quota_used, "remain": remain}
        return web.json_response({"errcode": 0, "errmsg": "ok", "quota": quota})

    def _check_data(
        self, template_id: str, data: dict[str, Any]
    ) -> tuple[dict[str, str], str | None]:
        """The flat key -> value data, or the errmsg (without rid) naming the first bad field."""
        if self.templates is not None:
            expected = self.templates[template_id]
            for key in expected:
                if key not in data:
                    return {}, f"argument invalid! data.{key}.value is empty"
            for key in data:
                if key not in expected:
                    return {}, f"argument invalid! data.{key} is not a keyword of the template"
        values: dict[str, str] = {}
        for key, item in data.items():
            value = item.get("value") if isinstance(item, dict) else None
            if value is None or value == "":
                return {}, f"argument invalid! data.{key}.value is empty"
            if not isinstance(value, str) or not self._valid_value(key, value):
                return {}, f"argument invalid! data.{key}.value invalid"
            values[key] = value
        return values, None

    def _valid_value(self, key: str, value: str) -> bool:
        """check_value of a data field, remembered: a fan-out sends a few texts to many users
        (checking them again was an eighth of the fake's CPU in bench/fanout.py)."""
        verdict = self._value_verdicts.get((key, value))
        if verdict is None:
            if len(self._value_verdicts) >= 10_000:
                self._value_verdicts.clear()
            verdict = check_value(field_type(key), value) is None
            self._value_verdicts[(key, value)] = verdict
        return verdict

    def _rid(self) -> str:
        return f"{self._rid_prefix}-{next(self._rids):08x}"

    def _error(self, errcode: int, errmsg: str | None = None) -> web.Response:
        text = errmsg or ERRMSGS.get(errcode, "error")
        return web.json_response({"errcode": errcode, "errmsg": f"{text} rid: {self._rid()}"})

    def _send_error(self, errcode: int, errmsg: str | None = None) -> web.Response:
        self._errcodes[errcode] += 1
        return self._error(errcode, errmsg)

    # -- control endpoints -------------------------------------------------------------------

    async def _get_messages(self, request: web.Request) -> web.Response:
        return web.json_response(self.messages)

    async def _clear_messages(self, request: web.Request) -> web.Response:
        cleared = len(self.messages)
        self.messages.clear()
        return web.json_response({"cleared": cleared})

    async def _post_grant(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            assert body is not None
            self.grant(
                body["openid"],
                body["template_id"],
                kind=body.get("kind", "one_time"),
                count=int(body.get("count", 1)),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad grant: {exc!r}") from None
        return web.json_response({"ok": True})

    async def _post_revoke(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            assert body is not None
            self.revoke(body["openid"], body["template_id"], kind=body.get("kind"))
        except (AssertionError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"bad revoke: {exc!r}") from None
        return web.json_response({"ok": True})

    async def _post_inject(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            assert body is not None
            self.inject(
                errcodes=[int(code) for code in body.get("errcodes", [])],
                http_status=body.get("http_status"),
                latency_s=float(body.get("latency_s", 0.0)),
                times=int(body.get("times", 1)),
            )
        except (AssertionError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad inject: {exc!r}") from None
        return web.json_response({"queued": len(self._faults)})

    async def _post_lose_replies(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            assert body is not None and body.get("reply", "delay") in ("delay", "drop")
            self.lose_replies(
                float(body["rate"]),
                reply=body.get("reply", "delay"),
                latency_s=float(body.get("latency_s", 30.0)),
                seed=int(body.get("seed", 0)),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"bad lose-replies: {exc!r}") from None
        return web.json_response({"ok": True})

    async def _post_expire_tokens(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return web.json_response({"ok": True})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


_SENT = b'{"errcode":0,"errmsg":"ok","msgid":%d}'  # what json_response would write


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        body = json.loads(await request.read())
    except ValueError:  # includes JSONDecodeError and bad UTF-8
        return None
    return body if isinstance(body, dict) else None


async def serve(host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
    """Run a FakeWeChat until cancelled; print its base URL (one line, flushed) once listening."""
    fake = FakeWeChat(**options)
    base_url = await fake.start(host, port)
    logger.info("fake WeChat listening on %s", base_url)
    print(base_url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a fake WeChat server API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--check-consent", action="store_true")
    parser.add_argument("--no-keep-messages", dest="keep_messages", action="store_false")
    args = parser.parse_args(argv)
    try:
        asyncio.run(
            serve(
                args.host,
                args.port,
                check_consent=args.check_consent,
                keep_messages=args.keep_messages,
            )
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
