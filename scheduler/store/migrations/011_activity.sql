-- Behaviour-driven cadence (issue 13 part 3; docs/plans.md#adapt): what the mini program reports
-- users doing (POST /v1/activity), read with their opens by plans' adapt rules.

-- One reported activity of a user. `event_id` is the reporter's id for it, unique per source
-- (the API token's name), so a retried batch is stored once.
CREATE TABLE activity (
    source      text NOT NULL,
    event_id    text NOT NULL,
    user_id     text NOT NULL,
    at          timestamptz NOT NULL,
    kind        text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);

-- A user's last activity, and last open (an open is activity too: the opens table is read, not
-- copied), for a batch of due users in one query (scheduler/store/activity.py).
CREATE INDEX activity_last ON activity (user_id, at DESC);
CREATE INDEX opens_last ON opens (user_id, opened_at DESC);
