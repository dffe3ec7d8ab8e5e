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

-- Claim a batch of deliveries and take consent for them, in one round trip and one transaction.
-- Rows already in the ledger (a double fire, another replica) are left alone; a one-time credit
-- is consumed only for a row this call inserted. Returns nothing when the plan is not active.
CREATE FUNCTION claim_deliveries(
    p_plan text, p_version int, p_template text, p_consent_kind text, p_replica text,
    p_occurrences text[], p_users text[], p_steps int[], p_due timestamptz[], p_messages jsonb[]
) RETURNS TABLE (delivery_id bigint, user_id text, allowed boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_state text;
    v_ids bigint[];
    v_users text[];
    v_ok text[];
BEGIN
    -- FOR SHARE: a pause waits for this claim to commit, so no batch starts after a pause.
    SELECT state INTO v_state FROM plans WHERE id = p_plan FOR SHARE;
    IF v_state IS DISTINCT FROM 'active' THEN
        RETURN;
    END IF;

    WITH inserted AS (
        INSERT INTO deliveries AS d
            (plan_id, plan_version, occurrence, user_id, step, due_at, status, message, claimed_by)
        SELECT p_plan, p_version, u.occ, u.uid, u.step, u.due, 'pending', u.msg, p_replica
        FROM unnest(p_occurrences, p_users, p_steps, p_due, p_messages)
             AS u (occ, uid, step, due, msg)
        ON CONFLICT (plan_id, occurrence, user_id) DO NOTHING
        RETURNING d.id, d.user_id
    )
    SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(inserted.user_id), '{}')
    INTO v_ids, v_users FROM inserted;

    IF p_consent_kind = 'long_term' THEN
        SELECT coalesce(array_agg(c.user_id), '{}') INTO v_ok FROM consent c
        WHERE c.template_id = p_template AND c.user_id = ANY (v_users)
          AND c.long_term AND NOT c.banned;
    ELSE
        WITH taken AS (
            UPDATE consent c SET credits = c.credits - 1, updated_at = now()
            WHERE c.template_id = p_template AND c.user_id = ANY (v_users)
              AND c.credits > 0 AND NOT c.banned
            RETURNING c.user_id
        )
        SELECT coalesce(array_agg(taken.user_id), '{}') INTO v_ok FROM taken;
    END IF;

    UPDATE deliveries SET status = 'skipped', reason = 'no_consent', finished_at = now()
    WHERE id = ANY (v_ids) AND NOT (deliveries.user_id = ANY (v_ok));

    RETURN QUERY SELECT i.id, i.uid, i.uid = ANY (v_ok)
                 FROM unnest(v_ids, v_users) AS i (id, uid);
END;
$$;

-- Record the channel's results for a batch, and what they say about consent: 43101 means the
-- user has none left; any other failure of a one-time send gives its credit back (WeChat did not
-- use it).
CREATE FUNCTION finish_deliveries(
    p_template text, p_consent_kind text,
    p_ids bigint[], p_statuses text[], p_reasons text[], p_errcodes int[], p_msgids bigint[],
    p_details text[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH done AS (
        UPDATE deliveries d
        SET status = r.status, reason = r.reason, errcode = r.errcode, msgid = r.msgid,
            detail = r.detail, finished_at = now()
        FROM unnest(p_ids, p_statuses, p_reasons, p_errcodes, p_msgids, p_details)
             AS r (id, status, reason, errcode, msgid, detail)
        WHERE d.id = r.id AND d.status = 'pending'
        RETURNING d.user_id, r.status, r.errcode
    ), gone AS (
        UPDATE consent c SET credits = 0, long_term = false, updated_at = now()
        FROM done
        WHERE c.template_id = p_template AND c.user_id = done.user_id AND done.errcode = 43101
        RETURNING c.user_id
    )
    UPDATE consent c SET credits = c.credits + 1, updated_at = now()
    FROM done
    WHERE p_consent_kind = 'one_time' AND c.template_id = p_template
      AND c.user_id = done.user_id AND done.status = 'failed'
      AND done.errcode IS DISTINCT FROM 43101
      AND c.user_id NOT IN (SELECT user_id FROM gone);
END;
$$;
