"""Tying an open of the mini program to the delivery that caused it. Pure.

The dispatcher adds `rmd=<delivery id>` to every message's `page`; the mini program reads it from
its launch options (scene 1014/1107) and reports it with POST /v1/opens.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

TRACKING_PARAM = "rmd"
NOTIFICATION_SCENES = frozenset({1014, 1107})  # opened from a subscribe message (wechat-api §8)


def tracked_page(page: str | None, delivery_id: int) -> str | None:
    """`page` with the tracking parameter (replacing one already there); None stays None: a card
    without a page does not open the mini program, so there is nothing to track."""
    return page_tracker(page)(delivery_id)


def page_tracker(page: str | None) -> Callable[[int], str | None]:
    """`tracked_page` for one page and many deliveries: the page is parsed once per fan-out."""
    if not page:
        return lambda _delivery_id: page
    path, _, query = page.partition("?")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != TRACKING_PARAM]
    prefix = f"{path}?{urlencode(pairs)}&" if pairs else f"{path}?"
    return lambda delivery_id: f"{prefix}{TRACKING_PARAM}={delivery_id}"
