"""The README's configuration table lists every setting (scheduler/settings.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scheduler.settings import Settings, variable_of

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_row_in_the_readme_configuration_table():
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", README.read_text(encoding="utf-8"), re.M))
    missing = sorted(variable_of(name) for name in Settings.model_fields)
    missing = [variable for variable in missing if variable not in rows]
    assert missing == [], f"add these to the README's configuration table: {missing}"


def test_the_table_lists_no_setting_that_does_not_exist():
    rows = set(
        re.findall(
            r"^\| `((?:REMINDERS_|DATABASE_URL)[A-Z_]*)` \|",
            README.read_text(encoding="utf-8"),
            re.M,
        )
    )
    known = {variable_of(name) for name in Settings.model_fields}
    assert rows - known == set()


def test_the_table_gives_each_setting_its_real_default():
    """A default changed in scheduler/settings.py is changed in the README too: operators size
    their replicas by these (the send concurrency also bounds a crash's `unknown`)."""
    documented = dict(
        re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", README.read_text(encoding="utf-8"), re.M)
    )
    wrong = {}
    for name, field in Settings.model_fields.items():
        variable, default = variable_of(name), field.get_default(call_default_factory=True)
        if variable not in documented or default is None:
            continue  # prose defaults ("unset", "host name") are read by people
        if isinstance(default, bool):
            actual = str(default).lower()
        elif isinstance(default, (list, dict)):
            actual = json.dumps(default)
        else:
            actual = str(default)
        if documented[variable] != actual:
            wrong[variable] = (documented[variable], actual)
    assert wrong == {}, f"README default -> real default: {wrong}"
