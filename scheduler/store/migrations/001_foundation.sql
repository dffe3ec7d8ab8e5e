-- Plans, enrolments, consent, the delivery ledger, replicas and admin state.
-- APScheduler keeps its own tables in the "apscheduler" schema of the same database.

CREATE TABLE plans (
    id              text PRIMARY KEY,
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'paused', 'cancelled', 'completed')),
    state_reason    text,
    current_version int,
    kind            text NOT NULL CHECK (kind IN ('calendar', 'relative')),
    -- Calendar plans without a start date count their steps from here.
    registered_at   timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plan_versions (
    plan_id      text NOT NULL REFERENCES plans (id),
    version      int NOT NULL,
    content_hash text NOT NULL,
    source_file  text,
    definition   jsonb NOT NULL,
    loaded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, version),
    UNIQUE (plan_id, content_hash)
);

CREATE TABLE enrollments (
    plan_id     text NOT NULL REFERENCES plans (id),
    user_id     text NOT NULL,
    start_at    timestamptz NOT NULL,
    tz          text NOT NULL,
    vars        jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'finished', 'stopped')),
    -- Relative plans: the 0-based index of the user's next step and when it is due.
    next_step   int NOT NULL DEFAULT 0,
    next_due_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, user_id)
);
CREATE INDEX enrollments_due ON enrollments (plan_id, next_due_at)
    WHERE status = 'active' AND next_due_at IS NOT NULL;

-- Current consent per (user, template); consent_events is the append-only history behind it.
CREATE TABLE consent (
    user_id     text NOT NULL,
    template_id text NOT NULL,
    credits     int NOT NULL DEFAULT 0 CHECK (credits >= 0),  -- one-time sends granted
    long_term   boolean NOT NULL DEFAULT false,
    banned      boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, template_id)
);

CREATE TABLE consent_events (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    template_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('one_time', 'long_term')),
    result      text NOT NULL,
    source      text NOT NULL,
    event_id    text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consent_events_user ON consent_events (user_id, template_id, recorded_at);

-- The delivery ledger: one row per (plan, occurrence, user), ever. The unique key is what makes
-- "never twice" hold across crashes, restarts and replicas.
CREATE TABLE deliveries (
    id           bigserial PRIMARY KEY,
    plan_id      text NOT NULL,
    plan_version int NOT NULL,
    occurrence   text NOT NULL,  -- calendar: scheduled fire time (UTC ISO); relative: 'step-N'
    user_id      text NOT NULL,
    step         int NOT NULL,
    due_at       timestamptz NOT NULL,
    status       text NOT NULL CHECK (status IN
                 ('pending', 'sent', 'failed', 'skipped', 'deferred', 'unknown', 'missed')),
    reason       text,
    errcode      int,
    msgid        bigint,
    detail       text,
    message      jsonb,
    claimed_by   text,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    UNIQUE (plan_id, occurrence, user_id)
);
CREATE INDEX deliveries_pending ON deliveries (claimed_by) WHERE status = 'pending';
CREATE INDEX deliveries_plan_status ON deliveries (plan_id, status);

CREATE TABLE replicas (
    id         text PRIMARY KEY,
    host       text NOT NULL,
    pid        int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);

-- Who did what to a plan, when and why (admin actions and plan-file changes).
CREATE TABLE plan_events (
    id           bigserial PRIMARY KEY,
    plan_id      text NOT NULL,
    action       text NOT NULL,
    actor        text NOT NULL,
    reason       text,
    plan_version int,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- claim_deliveries (the gate) and finish_deliveries (the results) are defined in later
-- migrations, with the tables they use.
