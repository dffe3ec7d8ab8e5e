"""Structured logs: with REMINDERS_LOG_JSON, one JSON object a line carrying the send's fields."""

from __future__ import annotations

import io
import json
import logging
import sys

from scheduler.app import metrics
from scheduler.channels.base import SendResult
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.logging_setup import JsonFormatter


def test_a_failed_send_is_one_json_line_with_plan_user_occurrence_and_outcome():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    metrics.send_log.addHandler(handler)
    level = metrics.send_log.level
    metrics.send_log.setLevel(logging.INFO)
    try:
        result = SendResult(Outcome.FAILED, Reason.CONSENT_GONE, 43101, None, "user refuse")
        metrics.observe_send("rehab-weekly", "step-3", "o-user-1", result, 0.0123)
    finally:
        metrics.send_log.removeHandler(handler)
        metrics.send_log.setLevel(level)

    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "scheduler.sends"
    assert {k: entry[k] for k in ("plan_id", "user", "occurrence", "outcome", "reason")} == {
        "plan_id": "rehab-weekly",
        "user": "o-user-1",
        "occurrence": "step-3",
        "outcome": "failed",
        "reason": "consent_gone",
    }
    assert entry["errcode"] == 43101 and entry["latency_ms"] == 12.3
    assert "consent_gone" in entry["message"]


def test_an_exception_is_kept_in_the_entry():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %s", ("now",), None)
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "boom now"
    assert "ValueError: bad" in entry["exception"]
