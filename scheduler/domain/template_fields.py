"""WeChat subscribe-message keyword value rules (wechat-api.md §4). Pure: no I/O.

A keyword key is its type plus an index (`thing1`, `number01`). `check_value` says whether a value
would pass WeChat's check for that type; WeChat answers a failing value with errcode 47003.

The rules follow the official table. Where it is vague we accept what WeChat is known to accept
rather than guess a stricter rule: e.g. `amount` may leave out the currency symbol, `time` and
`date` accept a space (or nothing) between the date and the time and spaces around `~`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Sequence

__all__ = ["KNOWN_TYPES", "check_value", "field_type"]

# Han ideographs (CJK Unified, Extension A, compatibility, and the supplementary planes).
_HAN = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
# Newlines, C0/C1 controls and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HAN_CHAR = re.compile(f"[{_HAN}]")
_ASCII_LETTER_OR_DIGIT = re.compile("[A-Za-z0-9]")
_ASCII_DIGIT = re.compile("[0-9]")

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_LETTERS = re.compile("[A-Za-z]+")
# "Symbol": anything printable that is not Han, not a Latin letter and not a digit.
_SYMBOLS = re.compile(f"[^{_HAN}A-Za-z0-9]+")
_CHARACTER_STRING = re.compile(f"[^{_HAN}]+")
_PHONE = re.compile(f"[^{_HAN}A-Za-z]+")
_PHRASE = re.compile(f"[{_HAN}]+")
_CAR_NUMBER = re.compile(f"[{_HAN}]?[A-Za-z0-9]+[{_HAN}]?")
_AMOUNT = re.compile(r"[¥￥$€£₩₹₽฿₫₱₺]?(?P<int>[0-9]+)(?:\.[0-9]+)?元?")

# Dates: y年m月d日, y年m月, m月d日, or y-m-d, y-m, m-d with '-', '/' or '.' as the separator.
_DATE_CJK = (
    r"(?:(?P<y1>\d{4})年(?P<m1>\d{1,2})月(?:(?P<d1>\d{1,2})日)?|(?P<m2>\d{1,2})月(?P<d2>\d{1,2})日)"
)
_DATE_SEP = (
    r"(?:(?P<y3>\d{4})(?P<s3>[-/.])(?P<m3>\d{1,2})(?:(?P=s3)(?P<d3>\d{1,2}))?"
    r"|(?P<m4>\d{1,2})(?P<s4>[-/.])(?P<d4>\d{1,2}))"
)
_TIME = r"(?P<hh>\d{1,2}):(?P<mm>\d{2})(?::(?P<ss>\d{2}))?"
_DATE_POINT = re.compile(
    rf"(?:{_DATE_CJK}|{_DATE_SEP})(?:(?:(?<=日)\s*|\s+){_TIME})?",
    re.ASCII,
)
_TIME_POINT = re.compile(
    rf"(?:(?:{_DATE_CJK}|{_DATE_SEP})(?:(?<=日)\s*|\s+))?{_TIME}",
    re.ASCII,
)
_RANGE_SPLIT = re.compile(r"\s*~\s*")


def field_type(key: str) -> str:
    """The keyword type of a data key: the key minus its trailing digits (`thing01` -> `thing`)."""
    return key.rstrip("0123456789")


def _is_valid_point(match: re.Match[str] | None) -> bool:
    """Whether a matched date and/or time names a real calendar day and a 24-hour clock time."""
    if match is None:
        return False
    parts = match.groupdict()
    year = next((parts[g] for g in ("y1", "y3") if parts[g]), None)
    month = next((parts[g] for g in ("m1", "m2", "m3", "m4") if parts[g]), None)
    day = next((parts[g] for g in ("d1", "d2", "d3", "d4") if parts[g]), None)
    if month is not None and not 1 <= int(month) <= 12:
        return False
    if day is not None:
        # Without a year, allow 29 February.
        last = calendar.monthrange(int(year) if year else 2000, int(month or 1))[1]
        if not 1 <= int(day) <= last:
            return False
    if parts["hh"] is not None:
        if int(parts["hh"]) > 23 or int(parts["mm"]) > 59:
            return False
        if parts["ss"] is not None and int(parts["ss"]) > 59:
            return False
    return True


def _check_points(type_: str, value: str, pattern: re.Pattern[str], shape: str) -> str | None:
    points = _RANGE_SPLIT.split(value.strip())
    if len(points) > 2:
        return f"{type_} allows at most one '~' (a range of two points)"
    for point in points:
        if not _is_valid_point(pattern.fullmatch(point)):
            return f"{type_} must be {shape}, got {point!r}"
    return None


def _check_thing(value: str) -> str | None:
    return _at_most("thing", value, 20)


def _check_number(value: str) -> str | None:
    if not _NUMBER.fullmatch(value):
        return "number allows digits only, with an optional decimal point"
    return _at_most("number", value, 32)


def _check_letter(value: str) -> str | None:
    if not _LETTERS.fullmatch(value):
        return "letter allows Latin letters only"
    return _at_most("letter", value, 32)


def _check_symbol(value: str) -> str | None:
    if not _SYMBOLS.fullmatch(value):
        return "symbol allows symbols only (no Chinese characters, letters or digits)"
    return _at_most("symbol", value, 5)


def _check_character_string(value: str) -> str | None:
    if not _CHARACTER_STRING.fullmatch(value):
        return "character_string allows digits, letters and symbols only (no Chinese characters)"
    return _at_most("character_string", value, 32)


def _check_time(value: str) -> str | None:
    shape = "a 24-hour time HH:MM or HH:MM:SS, optionally after a date"
    return _check_points("time", value, _TIME_POINT, shape)


def _check_date(value: str) -> str | None:
    shape = "a date like 2019年10月1日 or 2019-10-01, optionally with a 24-hour time"
    return _check_points("date", value, _DATE_POINT, shape)


def _check_amount(value: str) -> str | None:
    match = _AMOUNT.fullmatch(value)
    if match is None:
        return "amount must be a currency symbol and a number, optionally ending with 元"
    digits = len(match["int"])
    if digits > 10:
        return f"amount allows at most 10 digits before the decimal point, got {digits}"
    return None


def _check_phone_number(value: str) -> str | None:
    if not _PHONE.fullmatch(value) or not _ASCII_DIGIT.search(value):
        return "phone_number allows digits and symbols only"
    return _at_most("phone_number", value, 17)


def _check_car_number(value: str) -> str | None:
    if not _CAR_NUMBER.fullmatch(value):
        return "car_number allows letters and digits, with a Chinese character only first or last"
    return _at_most("car_number", value, 8)


def _check_name(value: str) -> str | None:
    if _ASCII_DIGIT.search(value):
        return "name does not allow digits"
    if _HAN_CHAR.search(value):
        # Mixed Chinese and Latin text counts as a Chinese name.
        return _at_most("name", value, 10, unit="characters when it contains Chinese")
    return _at_most("name", value, 20)


def _check_phrase(value: str) -> str | None:
    if not _PHRASE.fullmatch(value):
        return "phrase allows Chinese characters only"
    return _at_most("phrase", value, 5)


def _at_most(type_: str, value: str, limit: int, unit: str = "characters") -> str | None:
    if len(value) > limit:
        return f"{type_} allows at most {limit} {unit}, got {len(value)}"
    return None


_CHECKS: dict[str, Callable[[str], str | None]] = {
    "thing": _check_thing,
    "number": _check_number,
    "letter": _check_letter,
    "symbol": _check_symbol,
    "character_string": _check_character_string,
    "time": _check_time,
    "date": _check_date,
    "amount": _check_amount,
    "phone_number": _check_phone_number,
    "car_number": _check_car_number,
    "name": _check_name,
    "phrase": _check_phrase,
}

KNOWN_TYPES: frozenset[str] = frozenset({*_CHECKS, "enum"})


def check_value(type_: str, value: str, enum_values: Sequence[str] | None = None) -> str | None:
    """None if `value` is valid for keyword type `type_`, else a short plain-English reason.

    For `enum`, the value must be one of `enum_values`; without that list only the general rules
    (not empty, no control characters) are checked. An unknown type is always a reason.
    """
    if type_ not in KNOWN_TYPES:
        return f"unknown keyword type {type_!r}"
    if not value:
        return "value is empty"
    control = _CONTROL.search(value)
    if control is not None:
        return f"control characters are not allowed, found {control.group()!r}"
    if type_ == "enum":
        if enum_values is not None and value not in enum_values:
            return f"enum value {value!r} is not one of the template's values"
        return None
    return _CHECKS[type_](value)
