-- The gate's claim, typed and versioned: claim_deliveries_v2 takes one batch header and one
-- array of rows (each with its own rule stop and cap counters) instead of 004's twenty
-- index-aligned arrays, and runs DESIGN.md's gate as one small function per step.
-- claim_deliveries (v1) stays, unchanged, so replicas of the previous release keep claiming on
-- the same tables during a rolling upgrade; a later migration drops it once no release calls it.

-- The content variant a delivery carried (a step's weighted variants, docs/engagement.md). NULL:
-- the step's only content (reported as 'default'). Nullable without a default: adding it
-- rewrites nothing.
ALTER TABLE deliveries ADD COLUMN variant text;

-- Decided by the dispatcher before the call: a rule of steps 4-6 stopped the send.
CREATE TYPE gate_stop_v2 AS (status text, reason text, detail text, defer_until timestamptz);
-- One frequency-cap counter a send would count.
CREATE TYPE gate_cap_v2 AS (key text, cap_limit int, resets_at timestamptz);
-- What every row of a batch shares.
CREATE TYPE gate_batch_v2 AS (
    plan_id text, version int, template_id text, consent_kind text, replica text,
    on_capped text, max_delay interval
);
-- One send of the batch: its ledger key, message and variant, its stop (or NULL) and counters.
CREATE TYPE gate_row_v2 AS (
    occurrence text, user_id text, step int, due_at timestamptz, message jsonb,
    stop gate_stop_v2, caps gate_cap_v2[], variant text
);

-- The rows with their position in the batch: every step's per-row answer is an array indexed
-- by that position.
CREATE FUNCTION gate_v2_rows(p_rows gate_row_v2[])
RETURNS TABLE (pos int, occurrence text, user_id text, step int, due_at timestamptz,
               message jsonb, stop gate_stop_v2, caps gate_cap_v2[], variant text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.pos::int, r.occurrence, r.user_id, r.step, r.due_at, r.message, r.stop, r.caps,
           r.variant
    FROM unnest(p_rows) WITH ORDINALITY
         AS r (occurrence, user_id, step, due_at, message, stop, caps, variant, pos)
$$;

-- Step 8 first, so that only rows this call owns go on: new rows are inserted, a deferred row
-- is claimed again, any other row is left alone. Returns each position's row id, else NULL.
CREATE FUNCTION gate_v2_claim_rows(p_batch gate_batch_v2, p_rows gate_row_v2[])
RETURNS bigint[] LANGUAGE sql AS $$
    WITH input AS (SELECT * FROM gate_v2_rows(p_rows)),
    claimed AS (
        INSERT INTO deliveries AS d
            (plan_id, plan_version, occurrence, user_id, step, due_at, status, message,
             claimed_by, variant)
        SELECT (p_batch).plan_id, (p_batch).version, i.occurrence, i.user_id, i.step, i.due_at,
               'pending', i.message, (p_batch).replica, i.variant
        FROM input i
        ON CONFLICT (plan_id, occurrence, user_id) DO UPDATE
            SET status = 'pending', reason = NULL, detail = NULL, defer_until = NULL,
                claimed_by = excluded.claimed_by, claimed_at = now()
            WHERE d.status = 'deferred'
        RETURNING d.id, d.occurrence, d.user_id
    )
    SELECT coalesce(array_agg(c.id ORDER BY i.pos), '{}')
    FROM input i LEFT JOIN claimed c ON c.occurrence = i.occurrence AND c.user_id = i.user_id
$$;

-- Step 2: opted out of this plan or of every plan.
CREATE FUNCTION gate_v2_opted_out(p_plan text, p_rows gate_row_v2[], p_ids bigint[])
RETURNS boolean[] LANGUAGE sql AS $$
    SELECT coalesce(array_agg(p_ids[r.pos] IS NOT NULL AND EXISTS (
               SELECT 1 FROM opt_outs o
               WHERE o.user_id = r.user_id AND o.plan_id IN (p_plan, '*')) ORDER BY r.pos), '{}')
    FROM gate_v2_rows(p_rows) AS r
$$;

-- Step 3: consent for the rows still `p_open`, their consent rows locked (in user order, so
-- concurrent claims cannot deadlock) until the one-time credit is taken.
CREATE FUNCTION gate_v2_consented(p_batch gate_batch_v2, p_rows gate_row_v2[], p_open boolean[])
RETURNS boolean[] LANGUAGE plpgsql AS $$
DECLARE
    v_consented boolean[];
BEGIN
    PERFORM 1 FROM consent c JOIN gate_v2_rows(p_rows) AS r
        ON c.user_id = r.user_id AND c.template_id = (p_batch).template_id
    WHERE p_open[r.pos]
    ORDER BY c.user_id FOR UPDATE OF c;
    SELECT coalesce(array_agg(p_open[r.pos] AND coalesce(NOT c.banned AND
               CASE WHEN (p_batch).consent_kind = 'long_term' THEN c.long_term
                    ELSE c.credits > 0 END, false) ORDER BY r.pos), '{}')
    INTO v_consented
    FROM gate_v2_rows(p_rows) AS r
    LEFT JOIN consent c ON c.user_id = r.user_id AND c.template_id = (p_batch).template_id;
    RETURN v_consented;
END;
$$;

-- The counters the candidates would count, one row per (position, counter).
CREATE FUNCTION gate_v2_cap_uses(p_rows gate_row_v2[], p_candidate boolean[])
RETURNS TABLE (pos int, key text, cap_limit int, resets_at timestamptz)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.pos, c.key, c.cap_limit, c.resets_at
    FROM gate_v2_rows(p_rows) AS r, unnest(r.caps) AS c
    WHERE p_candidate[r.pos]
$$;

-- Step 7: caps, counted optimistically. Every counter the candidates use goes up by their
-- number unless that passes its limit; the upsert locks each counter row (in key order) until
-- commit, refused or not, so a concurrent claim waits and then sees the new count. A candidate
-- goes only if all its counters went up; the counts of those that did not are taken back.
-- Returns, per position, the latest reset among the full counters (NULL: the send may go).
CREATE FUNCTION gate_v2_count_caps(p_rows gate_row_v2[], p_candidate boolean[])
RETURNS timestamptz[] LANGUAGE plpgsql AS $$
DECLARE
    v_counted text[];
    v_capped_until timestamptz[];
BEGIN
    WITH needed AS (
        SELECT u.key, count(*)::int AS n, min(u.cap_limit) AS lim, max(u.resets_at) AS resets
        FROM gate_v2_cap_uses(p_rows, p_candidate) AS u GROUP BY u.key
    ), counted AS (
        INSERT INTO cap_counters AS c (key, used, last_limit, resets_at)
        SELECT n.key, n.n, n.lim, n.resets FROM needed n WHERE n.n <= n.lim ORDER BY n.key
        ON CONFLICT (key) DO UPDATE SET used = c.used + excluded.used
            WHERE c.used + excluded.used <= excluded.last_limit
        RETURNING c.key  -- a counter that would pass its limit is not updated, not returned
    )
    SELECT coalesce(array_agg(counted.key), '{}') INTO v_counted FROM counted;

    SELECT coalesce(array_agg(f.until ORDER BY r.pos), '{}') INTO v_capped_until
    FROM gate_v2_rows(p_rows) AS r
    LEFT JOIN (
        SELECT u.pos, max(u.resets_at) AS until
        FROM gate_v2_cap_uses(p_rows, p_candidate) AS u
        LEFT JOIN unnest(v_counted) AS ok (key) ON ok.key = u.key
        WHERE ok.key IS NULL
        GROUP BY u.pos
    ) AS f ON f.pos = r.pos;

    UPDATE cap_counters c SET used = c.used - n.n
    FROM (SELECT u.key, count(*)::int AS n
          FROM gate_v2_cap_uses(p_rows, p_candidate) AS u
          JOIN unnest(v_counted) AS ok (key) ON ok.key = u.key
          WHERE v_capped_until[u.pos] IS NOT NULL
          GROUP BY u.key) AS n
    WHERE c.key = n.key;
    RETURN v_capped_until;
END;
$$;

-- The credit of every allowed one-time send is taken now, and logged in the history.
CREATE FUNCTION gate_v2_take_credits(p_batch gate_batch_v2, p_rows gate_row_v2[],
                                     p_ids bigint[], p_allowed boolean[])
RETURNS void LANGUAGE sql AS $$
    WITH taken AS (
        UPDATE consent c SET credits = c.credits - 1, updated_at = now()
        FROM gate_v2_rows(p_rows) AS r
        WHERE p_allowed[r.pos] AND c.user_id = r.user_id
          AND c.template_id = (p_batch).template_id
    )
    INSERT INTO consent_events
        (user_id, template_id, kind, result, via, source, delivery_id, event_id)
    SELECT r.user_id, (p_batch).template_id, 'one_time', 'consume', 'send', 'dispatcher',
           p_ids[r.pos], 'delivery:' || p_ids[r.pos] || ':consume@' || now()  -- again after a put-back
    FROM gate_v2_rows(p_rows) AS r WHERE p_allowed[r.pos]
    ON CONFLICT DO NOTHING
$$;

-- Every claimed row not allowed gets its outcome now: skipped, or deferred to a moment within
-- the plan's max_delay of its due time. Returns those rows with their outcome.
CREATE FUNCTION gate_v2_record_refusals(
    p_batch gate_batch_v2, p_rows gate_row_v2[], p_ids bigint[], p_out boolean[],
    p_consented boolean[], p_capped_until timestamptz[], p_allowed boolean[]
) RETURNS TABLE (delivery_id bigint, user_id text, status text, reason text)
LANGUAGE sql AS $$
    WITH outcome AS (
        SELECT p_ids[r.pos] AS id, r.user_id AS uid,
               CASE WHEN p_out[r.pos] OR NOT p_consented[r.pos] THEN 'skipped'
                    WHEN (r.stop).status IS NOT NULL THEN (r.stop).status
                    WHEN capped_defer THEN 'deferred'
                    ELSE 'skipped' END AS status,
               CASE WHEN p_out[r.pos] THEN 'opted_out'
                    WHEN NOT p_consented[r.pos] THEN 'no_consent'
                    WHEN (r.stop).status IS NOT NULL THEN (r.stop).reason
                    ELSE 'capped' END AS reason,
               CASE WHEN p_out[r.pos] OR NOT p_consented[r.pos] THEN NULL
                    WHEN (r.stop).status IS NOT NULL THEN (r.stop).detail
                    ELSE 'a frequency cap is full until '
                         || to_char(p_capped_until[r.pos] AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD HH24:MI "UTC"') END AS detail,
               CASE WHEN p_out[r.pos] OR NOT p_consented[r.pos] THEN NULL
                    WHEN (r.stop).status IS NOT NULL THEN (r.stop).defer_until
                    WHEN capped_defer THEN p_capped_until[r.pos] END AS until
        FROM gate_v2_rows(p_rows) AS r,
             LATERAL (SELECT (p_batch).on_capped = 'defer'
                             AND p_capped_until[r.pos] - r.due_at <= (p_batch).max_delay
                             AS capped_defer) AS x
        WHERE p_ids[r.pos] IS NOT NULL AND NOT p_allowed[r.pos]
    ), recorded AS (
        UPDATE deliveries d
        SET status = o.status, reason = o.reason, detail = o.detail, defer_until = o.until,
            finished_at = CASE WHEN o.status = 'deferred' THEN NULL ELSE now() END
        FROM outcome o
        WHERE d.id = o.id
    )
    SELECT o.id, o.uid, o.status, o.reason FROM outcome o
$$;

-- The gate in DESIGN.md's order: 1 plan active, 8 the ledger claim (taken first), 2 not opted
-- out, 3 consent, 4-6 (decided by the dispatcher: each row's `stop`), 7 caps. A one-time
-- credit is consumed only by a row that passes every step. Returns every row this call claimed:
-- `pending` (send it now) or the outcome the gate gave it.
CREATE FUNCTION claim_deliveries_v2(p_batch gate_batch_v2, p_rows gate_row_v2[])
RETURNS TABLE (delivery_id bigint, user_id text, status text, reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_out boolean[];
    v_consented boolean[];
    v_candidate boolean[];  -- claimed, consented, not stopped by rules 4-6: faces the caps
    v_capped_until timestamptz[];
    v_allowed boolean[];
BEGIN
    -- 1. FOR SHARE: a pause waits for this claim to commit, so no batch starts after a pause.
    -- A completed plan fires no more, but the deferred sends of its last occurrence still go.
    PERFORM 1 FROM plans p
    WHERE p.id = (p_batch).plan_id AND p.state IN ('active', 'completed') FOR SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    v_ids := gate_v2_claim_rows(p_batch, p_rows);
    v_out := gate_v2_opted_out((p_batch).plan_id, p_rows, v_ids);
    SELECT coalesce(array_agg(v_ids[i] IS NOT NULL AND NOT v_out[i] ORDER BY i), '{}')
    INTO v_consented FROM generate_subscripts(p_rows, 1) AS i;
    v_consented := gate_v2_consented(p_batch, p_rows, v_consented);

    SELECT coalesce(array_agg(v_consented[r.pos] AND (r.stop).status IS NULL ORDER BY r.pos), '{}')
    INTO v_candidate FROM gate_v2_rows(p_rows) AS r;
    v_capped_until := gate_v2_count_caps(p_rows, v_candidate);
    SELECT coalesce(array_agg(v_candidate[i] AND v_capped_until[i] IS NULL ORDER BY i), '{}')
    INTO v_allowed FROM generate_subscripts(p_rows, 1) AS i;

    IF (p_batch).consent_kind = 'one_time' THEN
        PERFORM gate_v2_take_credits(p_batch, p_rows, v_ids, v_allowed);
    END IF;

    RETURN QUERY
        SELECT v_ids[r.pos], r.user_id, 'pending', NULL::text
        FROM gate_v2_rows(p_rows) AS r WHERE v_allowed[r.pos]
        UNION ALL
        SELECT * FROM gate_v2_record_refusals(p_batch, p_rows, v_ids, v_out, v_consented,
                                              v_capped_until, v_allowed);
END;
$$;
