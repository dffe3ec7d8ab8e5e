-- Operating the daemon: opt-outs, plan-file problems, resume catch-up, and the audit trail's
-- per-user actions. The opt-out check is gate step 2 of claim_deliveries (004).

-- A user opted out of one plan, or of every plan (plan_id '*'). Opting back in deletes the row;
-- plan_events keeps the history of both.
CREATE TABLE opt_outs (
    user_id     text NOT NULL,
    plan_id     text NOT NULL,  -- a plan id, or '*' for every plan
    actor       text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, plan_id)
);

-- The last error of each plan file that does not validate (the last good version keeps running).
-- A row disappears when its file validates again or is removed.
CREATE TABLE plan_problems (
    source_file text PRIMARY KEY,
    plan_id     text,            -- the plan this file held when it last validated, if known
    problems    jsonb NOT NULL,  -- [{"field": ..., "reason": ...}]
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- Occurrences of a calendar plan that a resume with catch-up asked to send; any replica takes
-- them (FOR UPDATE SKIP LOCKED), fans them out if still within grace, else records them missed.
CREATE TABLE catch_up (
    plan_id      text NOT NULL REFERENCES plans (id),
    fire_time    timestamptz NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    event_id     bigint,
    PRIMARY KEY (plan_id, fire_time)
);

-- When the current pause began: resume works out what the pause missed from it.
ALTER TABLE plans ADD COLUMN paused_at timestamptz;

-- Per-user actions (opt-out, stopping an enrolment) and actions on every plan (a global opt-out,
-- plan_id NULL) share the audit trail with plan actions.
ALTER TABLE plan_events ALTER COLUMN plan_id DROP NOT NULL;
ALTER TABLE plan_events ADD COLUMN user_id text;
ALTER TABLE plan_events ADD COLUMN details jsonb;
CREATE INDEX plan_events_plan ON plan_events (plan_id, recorded_at);
CREATE INDEX plan_events_time ON plan_events (recorded_at);

-- Status counts outcomes by due time per plan; the last errors by id.
CREATE INDEX deliveries_plan_due ON deliveries (plan_id, due_at);
