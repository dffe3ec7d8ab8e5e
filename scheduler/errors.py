"""Every error this package raises on purpose derives from `RemindersError`.

RemindersError
├── PlanError            a plan file is invalid (carries file, field path and reason)
├── ConfigError          settings or the environment cannot work
├── StoreError           the database refused or failed
└── ChannelError         a message could not be handed to the channel
    ├── TransientChannelError   worth retrying (timeouts, 5xx, errcode -1)
    └── PermanentChannelError   retrying unchanged will not help
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


class ChannelError(RemindersError):
    pass


class TransientChannelError(ChannelError):
    pass


class PermanentChannelError(ChannelError):
    pass
