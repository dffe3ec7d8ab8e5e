"""Tying an open of the mini program to the delivery that caused it. Pure.

The dispatcher adds `rmd=<delivery id>` to every message's `page`; the mini program reads it from
its launch options (scene 1014/1107) and reports it with POST /v1/opens.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

TRACKING_PARAM = "rmd"
NOTIFICATION_SCENES = frozenset({1014, 1107})  # opened from a subscribe message (wechat-api §8)


def tracked_page(page: str | None, delivery_id: int) -> str | None:
    """`page` with the tracking parameter (replacing one already there); None stays None: a card
    without a page does not open the mini program, so there is nothing to track."""
    if not page:
        return page
    path, _, query = page.partition("?")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != TRACKING_PARAM]
    pairs.append((TRACKING_PARAM, str(delivery_id)))
    return f"{path}?{urlencode(pairs)}"
