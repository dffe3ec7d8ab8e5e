"""The final outcome of one due (plan, occurrence, user), as the delivery ledger records it."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    PENDING = "pending"  # claimed and in flight; never final
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    DEFERRED = "deferred"
    UNKNOWN = "unknown"  # in flight when its process died: not resent (no idempotency key)
    MISSED = "missed"  # due while nothing could send it, and too late to catch up


class Reason(StrEnum):
    # skipped
    PAUSED = "paused"
    CANCELLED = "cancelled"
    OPTED_OUT = "opted_out"
    NO_CONSENT = "no_consent"
    # skipped or deferred by the policy rules (scheduler/domain/rules.py), in the gate's order
    CATEGORY = "category"  # the template kind is not allowed for the plan's category
    CONTENT = "content"  # promotional wording, a missing disclaimer, a forbidden claim
    FIELD = "field"  # a template field value WeChat would refuse (47003)
    QUIET_HOURS = "quiet_hours"  # inside the user's quiet hours
    CAPPED = "capped"  # a frequency cap is reached
    DEFER_EXPIRED = "defer_expired"  # deferred, and its max_delay ran out (e.g. while paused)
    ENROLLMENT_STOPPED = "enrollment_stopped"  # deferred, and the user's timeline was stopped
    UNRENDERABLE = "unrenderable"  # the message could not be rendered for this user
    ADAPTED = "adapted"  # an adapt rule skipped the step for this user (docs/plans.md#adapt)
    # missed
    GRACE_EXCEEDED = "grace_exceeded"  # due while nothing could send it, past the plan's grace
    # failed (from the channel)
    CONSENT_GONE = "consent_gone"  # 43101
    TRANSIENT = "transient"  # -1, 43108, 5xx, timeouts after every retry
    TOKEN = "token"  # the token stayed invalid after a refresh
    QUOTA = "quota"  # 45009
    BAD_OPENID = "bad_openid"  # 40003
    BAD_TEMPLATE = "bad_template"  # 40037
    BAD_PAGE = "bad_page"  # 41030
    TEMPLATE_BANNED = "template_banned"  # 43107
    SENSITIVE_CONTENT = "sensitive_content"  # 45168
    INVALID_DATA = "invalid_data"  # 47003
    BAD_REQUEST = "bad_request"  # 41001, 47001
    WECHAT_ERROR = "wechat_error"  # any other errcode
    # unknown: the request may have reached WeChat, so it is never sent again
    CRASHED_IN_FLIGHT = "crashed_in_flight"  # its process died (or lost its lease) meanwhile
    REPLY_TIMEOUT = "reply_timeout"  # sent, and no answer came in time
    REPLY_LOST = "reply_lost"  # the connection broke after the request was written
    SERVER_ERROR = "server_error"  # HTTP 5xx without an errcode (a proxy or gateway)
