"""Every error this package raises on purpose derives from `RemindersError`.

RemindersError
├── PlanError            a plan file is invalid (carries file, field path and reason)
├── ConfigError          settings or the environment cannot work
└── StoreError           the database refused or failed (store/ translates asyncpg's errors;
                         `store.postgres.is_transient` says which are worth a retry)

The channel raises none: every WeChat or network failure is a `SendResult` (an outcome and a
`Reason`), decided once in channels/wechat.py; HTTP status codes are chosen only in api/.
"""

from __future__ import annotations

from dataclasses import dataclass


class RemindersError(Exception):
    """Root of this package's errors."""


@dataclass(frozen=True)
class PlanProblem:
    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.reason}"


class PlanError(RemindersError):
    def __init__(self, problems: list[PlanProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConfigError(RemindersError):
    pass


class StoreError(RemindersError):
    pass
