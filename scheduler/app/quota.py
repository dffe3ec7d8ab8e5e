"""WeChat's daily send quota, read ahead so sends are held back before WeChat answers 45009.

WeChat counts every subscribe/send of the app against a daily limit that resets at midnight
China time (wechat-api.md §8). A replica reads what is left with the quota API
(`WeChatChannel.quota`) at most every `check_s`, counts its own sends down from it in between,
and holds a plan's sends back while what is left is within the reserve of the plan's priority:

    delivery.priority   stops sending while the quota left is at or under
    low                 REMINDERS_QUOTA_RESERVE_LOW of the daily limit (default 20 %)
    normal              REMINDERS_QUOTA_RESERVE_NORMAL (default 5 %)
    high                0: it sends until the quota is spent

so when a day's due sends exceed the quota, high-priority plans go first. A send held back is
deferred to the reset (or skipped when that is past the plan's max_delay), reason `quota`. Other
replicas' sends show only at the next read, so a cluster can still meet 45009, which stops
every send of that replica until the reset. Where the account cannot read its quota, only the
45009 rule applies.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from scheduler.channels.base import Quota

log = logging.getLogger(__name__)

QUOTA_ZONE = ZoneInfo("Asia/Shanghai")  # WeChat's daily quotas reset at midnight China time


def quota_reset_after(moment: datetime) -> datetime:
    """The next midnight in China after `moment`."""
    local = moment.astimezone(QUOTA_ZONE)
    return datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), QUOTA_ZONE)


class QuotaWatch:
    def __init__(
        self,
        read: Callable[[], object] | None,
        clock: Callable[[], datetime],
        *,
        check_s: float = 60.0,
        reserves: dict[str, float] | None = None,
    ):
        self._read = read  # the channel's quota(), None when the channel has none
        self._clock = clock
        self._check = timedelta(seconds=check_s)
        self._reserves = reserves or {"low": 0.2, "normal": 0.05, "high": 0.0}
        self._quota: Quota | None = None
        self._spent = 0  # this replica's sends since the read
        self._good_until: datetime | None = None  # the next read, or the reset if sooner
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read the quota again if the last read is old (or from before the reset)."""
        if self._read is None or self._fresh():
            return
        async with self._lock:
            if self._fresh():
                return
            now = self._clock()
            quota = await self._read()  # type: ignore[misc]
            self._quota = quota if isinstance(quota, Quota) else None
            self._spent = 0
            self._good_until = min(now + self._check, quota_reset_after(now))
            if self._quota is not None:
                log.debug("WeChat's send quota: %s", self._quota)

    def spent(self) -> None:
        """One send of this replica may have counted against the quota."""
        self._spent += 1

    def short_for(self, priority: str) -> str | None:
        """Why a plan of `priority` holds its sends back now, or None."""
        quota = self._quota
        if quota is None or not self._fresh():
            return None
        left = quota.remain - self._spent
        reserve = math.ceil(quota.daily_limit * self._reserves.get(priority, 0.0))
        if left > reserve:
            return None
        if reserve == 0:
            return f"WeChat's daily quota of {quota.daily_limit} is spent"
        return (
            f"{max(left, 0)} of WeChat's daily quota of {quota.daily_limit} left, kept for"
            f" plans of a higher priority than {priority} (reserve {reserve})"
        )

    def _fresh(self) -> bool:
        return self._good_until is not None and self._clock() < self._good_until
