"""The limits a plan or policy file must keep, in one place (docs/plans.md, "Limits").

Every number a file could otherwise make unbounded has one here, so that checking any file, and
rendering any message, costs bounded time and memory whatever the file says. Pure constants.
"""

from __future__ import annotations

# Reading: plan files are a few KB; pure-Python YAML parses dense text at about 150 KB/s, so a
# file at the limit still parses in well under a second.
MAX_FILE_BYTES = 64 * 1024
# A plan is 5 levels deep; the YAML composer recurses per level (and aliases can repeat a subtree
# without end): bound both the nesting and the number of values once aliases are expanded.
MAX_DEPTH = 32
MAX_NODES = 100_000

# Schedules: the daemon finds a calendar plan's last fire time by walking its `count` fire times
# (about 0.1 ms each). The default caps allow 2 messages a day and 2-3 a week per category, so
# 1,000 is years of messages; longer programmes give an `end` date, or no end.
MAX_COUNT = 1_000
MAX_TIMES_PER_DAY = 24  # `at` lists; more often than hourly is what `every` is for
MAX_DATES = 366  # `except_dates` / `extra_dates`: a year of exceptions each
# Durations (`every`, `duration`, `first_after`, `grace`, `max_delay`): at most 100 years.
MAX_DURATION_YEARS = 100
MAX_DURATION_DAYS = 36_525
# Dates in a plan (`start`, `end`): far from the edges of what the date maths can represent.
MIN_YEAR, MAX_YEAR = 2000, 2999
# Caps and frequency limits, which the gate counts in SQL integers.
MAX_CAP = 1_000_000  # a million a day is no cap at all; far inside a 32-bit integer

# Text: any string in a plan or policy (names, texts, ids, words).
MAX_TEXT = 1_000
MAX_ZONE_NAME = 64  # IANA names are under 40 characters
# Format specs in message texts (`{step:02d}`): a WeChat field holds at most 32 characters, so a
# wider width or precision is never needed (and a huge one would build a huge string per send).
MAX_FORMAT_WIDTH = 32
# Content variants (message.variants, message.steps.N.variants): a handful of wordings to compare,
# each with a positive integer weight; the total weight stays small for the assignment's modulo.
MAX_VARIANTS = 10
MAX_VARIANT_WEIGHT = 1_000

# Adapt rules (`adapt`) and the extra steps they send (`message.extra`): every due user is
# matched against the rules in order, so a handful is all a plan needs.
MAX_ADAPT_RULES = 20
MAX_EXTRA_STEPS = 20
