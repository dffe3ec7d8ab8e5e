-- claim_deliveries as in 003, set-based: membership tests are hash joins over the batch instead
-- of `= ANY (array)` scans (quadratic in the batch size), and the one-time credits taken are
-- appended to the consent history here, so a batch's claim stays one round trip.
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

    -- Gate step 8 first: only rows this call inserts go on; a row already claimed is left alone.
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
    SELECT coalesce(array_agg(DISTINCT o.user_id), '{}') INTO v_out
    FROM opt_outs o JOIN unnest(v_users) AS b (uid) ON o.user_id = b.uid
    WHERE o.plan_id IN (p_plan, '*');

    -- Gate step 3: consent (a one-time credit is consumed here, in the claim's transaction).
    IF p_consent_kind = 'long_term' THEN
        SELECT coalesce(array_agg(c.user_id), '{}') INTO v_ok
        FROM consent c JOIN unnest(v_users) AS b (uid) ON c.user_id = b.uid
        WHERE c.template_id = p_template AND c.long_term AND NOT c.banned
          AND NOT (b.uid = ANY (v_out));  -- v_out is nearly always empty
    ELSE
        WITH taken AS (
            UPDATE consent c SET credits = c.credits - 1, updated_at = now()
            FROM unnest(v_users) AS b (uid)
            WHERE c.template_id = p_template AND c.user_id = b.uid
              AND c.credits > 0 AND NOT c.banned AND NOT (b.uid = ANY (v_out))
            RETURNING c.user_id
        )
        SELECT coalesce(array_agg(taken.user_id), '{}') INTO v_ok FROM taken;

        INSERT INTO consent_events
            (user_id, template_id, kind, result, via, source, delivery_id, event_id)
        SELECT b.uid, p_template, 'one_time', 'consume', 'send', 'dispatcher', b.id,
               'delivery:' || b.id || ':consume'
        FROM unnest(v_ids, v_users) AS b (id, uid)
        WHERE b.uid IN (SELECT unnest(v_ok))
        ON CONFLICT DO NOTHING;
    END IF;

    UPDATE deliveries d
    SET status = 'skipped', finished_at = now(),
        reason = CASE WHEN r.uid = ANY (v_out) THEN 'opted_out' ELSE 'no_consent' END
    FROM unnest(v_ids, v_users) AS r (id, uid)
    WHERE d.id = r.id AND r.uid NOT IN (SELECT unnest(v_ok));

    RETURN QUERY
        SELECT b.id, b.uid, ok.uid IS NOT NULL
        FROM unnest(v_ids, v_users) AS b (id, uid)
        LEFT JOIN (SELECT DISTINCT unnest(v_ok)) AS ok (uid) ON ok.uid = b.uid;
END;
$$;
