"""The WeChat keyword value rules (wechat-api.md §4): examples and counter-examples per type."""

from __future__ import annotations

import pytest

from scheduler.domain.template_fields import KNOWN_TYPES, check_value, field_type

VALID: list[tuple[str, str]] = [
    ("thing", "康复训练提醒"),
    ("thing", "x" * 20),
    ("thing", "第3周：拉伸 + 步行 30min!"),
    ("number", "0"),
    ("number", "3.14"),
    ("number", "1" * 32),
    ("letter", "abcXYZ"),
    ("letter", "a" * 32),
    ("symbol", "+-*/"),
    ("symbol", "#####"),
    ("character_string", "ORDER-2024_001#A"),
    ("character_string", "Z" * 32),
    ("time", "15:01"),
    ("time", "9:05"),
    ("time", "15:01:59"),
    ("time", "2019年10月1日 15:01"),
    ("time", "2019年10月1日15:01"),
    ("time", "2019-10-01 15:01"),
    ("time", "10月1日 08:00"),
    ("time", "15:01~16:00"),
    ("time", "2019-10-01 15:01 ~ 2019-10-01 16:00"),
    ("date", "2019年10月1日"),
    ("date", "2019年10月"),
    ("date", "10月1日"),
    ("date", "2018-01-01"),
    ("date", "2018/01/01"),
    ("date", "2018.01.01"),
    ("date", "2018-01"),
    ("date", "01-01"),
    ("date", "2020-02-29"),
    ("date", "02-29"),
    ("date", "2019-10-01 08:00"),
    ("date", "2019年10月1日 08:00:00"),
    ("date", "2019-10-01~2019-10-07"),
    ("amount", "¥100"),
    ("amount", "￥100.50"),
    ("amount", "$9.99"),
    ("amount", "100元"),
    ("amount", "¥1234567890.00元"),
    ("phone_number", "+86-0766-66888866"),
    ("phone_number", "13800138000"),
    ("phone_number", "(010) 1234 5678"),
    ("car_number", "粤A8Y2X5"),
    ("car_number", "粤B12345学"),
    ("car_number", "粤AD12345"),
    ("name", "张三"),
    ("name", "欧阳娜娜娜娜娜娜娜娜"),
    ("name", "John Smith"),
    ("name", "Jean-Luc O'Neil"),
    ("name", "张Tom"),
    ("phrase", "配送中"),
    ("phrase", "已完成训练"),
]

INVALID: list[tuple[str, str, str]] = [
    ("thing", "x" * 21, "thing allows at most 20 characters, got 21"),
    ("thing", "", "value is empty"),
    ("thing", "两行\n文字", "control characters"),
    ("thing", "tab\there", "control characters"),
    ("number", "12a", "digits only"),
    ("number", "-5", "digits only"),
    ("number", "1.2.3", "digits only"),
    ("number", "1" * 33, "at most 32"),
    ("letter", "abc1", "letters only"),
    ("letter", "中文", "letters only"),
    ("letter", "a" * 33, "at most 32"),
    ("symbol", "abc", "symbols only"),
    ("symbol", "+-*/#!", "at most 5"),
    ("character_string", "订单123", "no Chinese"),
    ("character_string", "Z" * 33, "at most 32"),
    ("time", "25:00", "24-hour time"),
    ("time", "24:00", "24-hour time"),
    ("time", "12:60", "24-hour time"),
    ("time", "15:01:60", "24-hour time"),
    ("time", "下午三点", "24-hour time"),
    ("time", "2019-10-01", "24-hour time"),
    ("time", "15:01~16:00~17:00", "at most one '~'"),
    ("date", "2019-13-01", "date like"),
    ("date", "2019-02-29", "date like"),
    ("date", "2019-04-31", "date like"),
    ("date", "2019年10月1日 25:00", "date like"),
    ("date", "yesterday", "date like"),
    ("date", "2019-10/01", "date like"),
    ("amount", "¥12345678901", "at most 10 digits"),
    ("amount", "100 RMB", "currency symbol"),
    ("amount", "¥¥100", "currency symbol"),
    ("phone_number", "call me", "digits and symbols"),
    ("phone_number", "1" * 18, "at most 17"),
    ("car_number", "粤A8Y2X5XYZ", "at most 8"),
    ("car_number", "A粤8Y2X5", "first or last"),
    ("name", "张三三三三三三三三三三", "at most 10"),
    ("name", "A" * 21, "at most 20"),
    ("name", "R2D2", "digits"),
    ("phrase", "配送中ing", "Chinese characters only"),
    ("phrase", "正在配送途中了", "at most 5"),
]


@pytest.mark.parametrize(("type_", "value"), VALID)
def test_valid_values_pass(type_: str, value: str) -> None:
    assert check_value(type_, value) is None


@pytest.mark.parametrize(("type_", "value", "reason"), INVALID)
def test_invalid_values_say_why(type_: str, value: str, reason: str) -> None:
    problem = check_value(type_, value)
    assert problem is not None
    assert reason in problem


def test_every_known_type_is_covered_by_examples() -> None:
    covered = {type_ for type_, _ in VALID} | {"enum"}
    assert covered == KNOWN_TYPES


@pytest.mark.parametrize(
    ("key", "type_"),
    [("thing1", "thing"), ("number01", "number"), ("character_string12", "character_string")],
)
def test_field_type_strips_the_index(key: str, type_: str) -> None:
    assert field_type(key) == type_


def test_enum_checks_the_template_values_when_known() -> None:
    assert check_value("enum", "已完成", ["已完成", "未完成"]) is None
    assert check_value("enum", "进行中", ["已完成", "未完成"]) is not None
    assert check_value("enum", "进行中") is None  # the list is not known: nothing to compare
    assert check_value("enum", "a\nb") is not None


def test_unknown_type_is_a_reason() -> None:
    problem = check_value("title", "hello")
    assert problem is not None
    assert "unknown keyword type" in problem


def test_control_characters_are_refused_for_every_type() -> None:
    for type_ in KNOWN_TYPES:
        assert check_value(type_, "12\r\n") is not None, type_
