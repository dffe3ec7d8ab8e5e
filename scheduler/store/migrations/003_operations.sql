-- Operating the daemon: opt-outs, plan-file problems, resume catch-up, and the audit trail's
-- per-user actions. The opt-out check becomes gate step 2 of claim_deliveries.

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

-- claim_deliveries as in 001, with gate step 2: an opted-out user's row is recorded skipped
-- (opted_out) and takes no consent.
CREATE OR REPLACE FUNCTION claim_deliveries(
    p_plan text, p_version int, p_template text, p_consent_kind text, p_replica text,
    p_occurrences text[], p_users text[], p_steps int[], p_due timestamptz[], p_messages jsonb[]
) RETURNS TABLE (delivery_id bigint, user_id text, allowed boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_state text;
    v_ids bigint[];
    v_users text[];
    v_out text[];
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

    -- Gate step 2: opted out of this plan or of every plan.
    SELECT coalesce(array_agg(DISTINCT o.user_id), '{}') INTO v_out FROM opt_outs o
    WHERE o.user_id = ANY (v_users) AND o.plan_id IN (p_plan, '*');

    IF p_consent_kind = 'long_term' THEN
        SELECT coalesce(array_agg(c.user_id), '{}') INTO v_ok FROM consent c
        WHERE c.template_id = p_template AND c.user_id = ANY (v_users)
          AND NOT (c.user_id = ANY (v_out))
          AND c.long_term AND NOT c.banned;
    ELSE
        WITH taken AS (
            UPDATE consent c SET credits = c.credits - 1, updated_at = now()
            WHERE c.template_id = p_template AND c.user_id = ANY (v_users)
              AND NOT (c.user_id = ANY (v_out))
              AND c.credits > 0 AND NOT c.banned
            RETURNING c.user_id
        )
        SELECT coalesce(array_agg(taken.user_id), '{}') INTO v_ok FROM taken;
    END IF;

    UPDATE deliveries SET status = 'skipped', reason = 'opted_out', finished_at = now()
    WHERE id = ANY (v_ids) AND deliveries.user_id = ANY (v_out);

    UPDATE deliveries SET status = 'skipped', reason = 'no_consent', finished_at = now()
    WHERE id = ANY (v_ids) AND NOT (deliveries.user_id = ANY (v_ok))
      AND NOT (deliveries.user_id = ANY (v_out));

    RETURN QUERY SELECT i.id, i.uid, i.uid = ANY (v_ok)
                 FROM unnest(v_ids, v_users) AS i (id, uid);
END;
$$;
