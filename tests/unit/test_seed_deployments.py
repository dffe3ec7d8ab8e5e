"""The source article's five deployments, written as a newcomer would from docs/plans.md, pass
`reminders validate` under the built-in policy with no exception; the article's warnings are
still refused (seeds/000: 案例1-5, 坑4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.cli import main

SHANGHAI = {"timezone": "Asia/Shanghai"}

SEED_DEPLOYMENTS: dict[str, dict[str, Any]] = {
    # 案例1: a community hospital's post-surgery rehab guidance, once a week for 3 months.
    "rehab": {
        "category": "medical",
        "consent": "one_time",
        "schedule": {"relative": {"every": "1 week", "count": 12, "at": "09:00"}},
        "template": {"id": "t_rehab", "fields": {"thing1": "thing", "thing2": "thing"}},
        "message": {"default": {"thing1": "第{step}周康复动作", "thing2": "仅供参考,不构成诊断"}},
    },
    # 案例2: a children's coding school, a weekly learning pack every Friday for 8 weeks.
    "course": {
        "category": "education",
        "consent": "long_term",
        "schedule": {
            "calendar": {**SHANGHAI, "weekly": {"days": "fri", "at": "18:00"}, "count": 8}
        },
        "template": {"id": "t_course", "fields": {"thing1": "thing"}},
        "message": {"default": {"thing1": "第{step}周知识点总结"}},
    },
    # 案例3: a social-security office, the pension on the 5th of every month.
    "pension": {
        "category": "government",
        "consent": "long_term",
        "schedule": {"calendar": {**SHANGHAI, "monthly": {"day": 5, "at": "10:00"}}},
        "template": {"id": "t_pension", "fields": {"thing1": "thing"}},
        "message": {"default": {"thing1": "上月养老金已到账"}},
    },
    # 案例4: a bus company's morning congestion alert, on every working day before the rush.
    "commute": {
        "category": "transport",
        "consent": "long_term",
        "schedule": {"calendar": {**SHANGHAI, "workdays": {"at": "07:30", "calendar": "CN"}}},
        "template": {"id": "t_commute", "fields": {"thing1": "thing"}},
        "message": {"default": {"thing1": "你常乘的2路当前拥堵"}},
    },
    # 案例5: a yoga studio's 30-day course, practice at 08:00 and a check-in at 20:00.
    "practice": {
        "category": "other",
        "consent": "one_time",
        "schedule": {"calendar": {**SHANGHAI, "daily": {"at": ["08:00", "20:00"]}, "count": 60}},
        "template": {"id": "t_practice", "fields": {"thing1": "thing"}},
        "message": {"default": {"thing1": "今日练习:肩颈放松"}},
    },
}

# What the article warns against (坑4 and its rules), each refused with the cap or rule named.
SEED_WARNINGS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "medical three times a week",
        "rehab",
        {
            "schedule": {
                "calendar": {**SHANGHAI, "weekly": {"days": ["mon", "wed", "fri"], "at": "09:00"}}
            }
        },
        "over the cap of 2 medical messages per user per week",
    ),
    (
        "education four times a week",
        "course",
        {
            "schedule": {
                "calendar": {
                    **SHANGHAI,
                    "weekly": {"days": ["mon", "tue", "thu", "fri"], "at": "18:00"},
                }
            }
        },
        "over the cap of 3 education messages per user per week",
    ),
    (
        "three a day",
        "practice",
        {"schedule": {"calendar": {**SHANGHAI, "daily": {"at": ["08:00", "12:00", "20:00"]}}}},
        "over the cap of 2 per user per day, all plans together",
    ),
    (
        "a promotion in a long-term reminder",
        "course",
        {"message": {"default": {"thing1": "续课优惠八折"}}},
        "promotional",
    ),
]


def write(folder: Path, plan_id: str, plan: dict[str, Any]) -> Path:
    path = folder / f"{plan_id}.yaml"
    document = {"id": plan_id, "name": plan_id.title(), **plan}
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    return path


def test_the_five_deployments_pass_the_default_policy_together(tmp_path: Path, capsys) -> None:
    for plan_id, plan in SEED_DEPLOYMENTS.items():
        write(tmp_path, plan_id, plan)
    assert not (tmp_path / "policy.yaml").exists()  # the built-in defaults, no exception
    code = main(["validate", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(line.split("(")[-1] for line in out.splitlines() if line.startswith("ok")) == [
        f"{plan_id})" for plan_id in sorted(SEED_DEPLOYMENTS)
    ]


@pytest.mark.parametrize(
    ("base", "change", "says"),
    [w[1:] for w in SEED_WARNINGS],
    ids=[w[0] for w in SEED_WARNINGS],
)
def test_the_seeds_warnings_are_still_refused(
    tmp_path: Path, capsys, base: str, change: dict[str, Any], says: str
) -> None:
    changed = {**SEED_DEPLOYMENTS[base], **change}
    path = write(tmp_path, base, changed)
    code = main(["validate", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert any(line.startswith(f"error  {path}") and says in line for line in out.splitlines()), out
