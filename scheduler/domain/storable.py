"""What PostgreSQL and Python can store and represent: the checks every boundary shares. Pure.

The API (through the pydantic types of `scheduler.api.fields`) and WeChat's push parser refuse
what fails here, with a reason, before it reaches the database: text PostgreSQL cannot hold (NUL)
or that is not Unicode (a lone surrogate cannot be encoded), integers beyond the column's type,
and moments outside a range where every conversion (offsets, UTC, the database) is safe.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Moments any report may carry: wide enough for history and for plans years ahead, narrow
# enough that no offset or conversion overflows (year 9999 with -05:00 does, so does year 1).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)

_ASCII_INT = re.compile(r"-?[0-9]{1,19}")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character, which cannot be stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate: not valid Unicode text"
    return None


def moment_problem(value: datetime) -> str | None:
    """Why the aware `value` is out of range, or None when it is within it."""
    if not EARLIEST <= value < LATEST:
        return f"must be from {EARLIEST:%Y-%m-%d} to before {LATEST:%Y-%m-%d} (UTC)"
    return None


def ascii_int(text: str, low: int, high: int) -> int | None:
    """`text` as an integer when it is ASCII digits (an optional minus) within [low, high]."""
    if not _ASCII_INT.fullmatch(text):
        return None
    number = int(text)
    return number if low <= number <= high else None
