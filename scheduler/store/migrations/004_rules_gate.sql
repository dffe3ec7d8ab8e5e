-- The rules before every send (docs/rules.md): frequency-cap counters, deferred deliveries, and
-- claim_deliveries running the whole gate in DESIGN.md's order in one round trip per batch.

-- One counter per cap and window, e.g. 'user-day:oABC:2026-03-08'. The gate counts a batch's
-- sends on their counters in the transaction of its claim, with the counter rows locked (in key
-- order, so concurrent dispatchers cannot deadlock) until commit, and allows a send only if every
-- counter it touches had room: any number of dispatchers and replicas never exceed a cap.
CREATE TABLE cap_counters (
    key        text PRIMARY KEY,
    used       int NOT NULL DEFAULT 0 CHECK (used >= 0),
    last_limit int NOT NULL,  -- the limit of the latest send counted (each send brings its own)
    resets_at  timestamptz NOT NULL  -- when its window ends; past rows are only history
) WITH (fillfactor = 80);  -- room on the page: a count goes up as a HOT update
CREATE INDEX cap_counters_resets ON cap_counters (resets_at);

-- A deferred delivery waits for `defer_until`, then goes through the gate again (its row is
-- claimed anew: see the ON CONFLICT clause below).
ALTER TABLE deliveries ADD COLUMN defer_until timestamptz;
CREATE INDEX deliveries_deferred ON deliveries (defer_until) WHERE status = 'deferred';

-- Gate order (DESIGN.md): 1 plan active, 2 not opted out, 3 consent, 4-6 category, content,
-- field and quiet-hours rules (decided by the dispatcher on the rendered message and passed in
-- p_stop_*), 7 caps, 8 the ledger claim. The claim is taken first, so that only rows this call
-- owns go on; a one-time credit is consumed only by a row that passes every step.
CREATE FUNCTION claim_deliveries(
    p_plan text, p_version int, p_template text, p_consent_kind text, p_replica text,
    p_occurrences text[], p_users text[], p_steps int[], p_due timestamptz[], p_messages jsonb[],
    p_stop_status text[], p_stop_reason text[], p_stop_detail text[], p_defer_until timestamptz[],
    p_cap_rows int[], p_cap_keys text[], p_cap_limits int[], p_cap_resets timestamptz[],
    p_on_capped text, p_max_delay interval
) RETURNS TABLE (delivery_id bigint, user_id text, status text, reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
-- Every v_* array below has one entry per position of the batch (the p_* arrays' index), so
-- each step is a hash join or a subscript, never a scan of another array per row.
DECLARE
    v_state text;
    v_id bigint[];              -- the ledger row this call claimed there, else NULL
    v_out boolean[];            -- opted out
    v_consented boolean[];
    v_candidate boolean[];      -- claimed, consented, not stopped by rules 4-6: faces the caps
    v_counted text[];           -- the counters that had room for all their candidates
    v_capped_until timestamptz[];  -- a full counter's reset, else NULL
    v_allowed boolean[];
    v_refused_ids bigint[];     -- the rows the gate stopped, with the outcome they got
    v_refused_users text[];
    v_refused_status text[];
    v_refused_reason text[];
BEGIN
    -- 1. FOR SHARE: a pause waits for this claim to commit, so no batch starts after a pause.
    -- A completed plan fires no more, but the deferred sends of its last occurrence still go.
    SELECT state INTO v_state FROM plans WHERE id = p_plan FOR SHARE;
    IF v_state IS NULL OR v_state NOT IN ('active', 'completed') THEN
        RETURN;
    END IF;

    -- 8. New rows are inserted; a deferred row is claimed again; any other row is left alone.
    WITH input AS (
        SELECT * FROM unnest(p_occurrences, p_users, p_steps, p_due, p_messages)
                      WITH ORDINALITY AS u (occ, uid, step, due, msg, pos)
    ), claimed AS (
        INSERT INTO deliveries AS d
            (plan_id, plan_version, occurrence, user_id, step, due_at, status, message, claimed_by)
        SELECT p_plan, p_version, occ, uid, step, due, 'pending', msg, p_replica FROM input
        ON CONFLICT (plan_id, occurrence, user_id) DO UPDATE
            SET status = 'pending', reason = NULL, detail = NULL, defer_until = NULL,
                claimed_by = p_replica, claimed_at = now()
            WHERE d.status = 'deferred'
        RETURNING d.id, d.occurrence, d.user_id
    )
    SELECT coalesce(array_agg(c.id ORDER BY inp.pos), '{}') INTO v_id
    FROM input inp LEFT JOIN claimed c ON c.occurrence = inp.occ AND c.user_id = inp.uid;

    -- 2. Opted out of this plan or of every plan.
    SELECT coalesce(array_agg(v_id[i] IS NOT NULL AND EXISTS (
               SELECT 1 FROM opt_outs o
               WHERE o.user_id = p_users[i] AND o.plan_id IN (p_plan, '*')) ORDER BY i), '{}')
    INTO v_out FROM generate_subscripts(p_users, 1) AS i;

    -- 3. Consent, the rows locked (in user order) until the credit is taken.
    PERFORM 1 FROM consent c JOIN generate_subscripts(p_users, 1) AS i
        ON c.user_id = p_users[i] AND c.template_id = p_template
    WHERE v_id[i] IS NOT NULL AND NOT v_out[i]
    ORDER BY c.user_id FOR UPDATE OF c;
    SELECT coalesce(array_agg(coalesce(NOT c.banned AND CASE WHEN p_consent_kind = 'long_term'
               THEN c.long_term ELSE c.credits > 0 END, false) ORDER BY i), '{}')
    INTO v_consented
    FROM generate_subscripts(p_users, 1) AS i
    LEFT JOIN consent c ON c.user_id = p_users[i] AND c.template_id = p_template;

    -- 4-6 were decided before the call (p_stop_*): the consented rows they let through face
    -- the caps.
    SELECT coalesce(array_agg(v_id[i] IS NOT NULL AND NOT v_out[i] AND v_consented[i]
               AND p_stop_status[i] IS NULL ORDER BY i), '{}')
    INTO v_candidate FROM generate_subscripts(p_users, 1) AS i;

    -- 7. Caps, counted optimistically: every counter the candidates use goes up by their number,
    -- unless that passes its limit. The upsert locks each counter row (in key order) until
    -- commit, refused or not, so a concurrent claim waits and then sees the new count.
    WITH needed AS (
        SELECT k.key, count(*)::int AS n, min(k.lim) AS lim, max(k.resets) AS resets
        FROM unnest(p_cap_rows, p_cap_keys, p_cap_limits, p_cap_resets)
             AS k (pos, key, lim, resets)
        WHERE v_candidate[k.pos]
        GROUP BY k.key
    ), counted AS (
        INSERT INTO cap_counters AS c (key, used, last_limit, resets_at)
        SELECT key, n, lim, resets FROM needed WHERE n <= lim ORDER BY key
        ON CONFLICT (key) DO UPDATE SET used = c.used + excluded.used
            WHERE c.used + excluded.used <= excluded.last_limit
        RETURNING c.key  -- a counter that would pass its limit is not updated, not returned
    )
    SELECT coalesce(array_agg(key), '{}') INTO v_counted FROM counted;

    -- A candidate goes only if all its counters went up; it waits for the latest reset among
    -- those that did not.
    SELECT coalesce(array_agg(f.until ORDER BY i), '{}') INTO v_capped_until
    FROM generate_subscripts(p_users, 1) AS i
    LEFT JOIN (
        SELECT k.pos, max(k.resets) AS until
        FROM unnest(p_cap_rows, p_cap_keys, p_cap_resets) AS k (pos, key, resets)
        LEFT JOIN unnest(v_counted) AS ok (key) ON ok.key = k.key
        WHERE v_candidate[k.pos] AND ok.key IS NULL
        GROUP BY k.pos
    ) AS f ON f.pos = i;

    -- The counts of candidates that did not go are taken back (rare: a cap was reached).
    UPDATE cap_counters c SET used = c.used - n.n
    FROM (SELECT k.key, count(*)::int AS n
          FROM unnest(p_cap_rows, p_cap_keys) AS k (pos, key)
          JOIN unnest(v_counted) AS ok (key) ON ok.key = k.key
          WHERE v_candidate[k.pos] AND v_capped_until[k.pos] IS NOT NULL
          GROUP BY k.key) AS n
    WHERE c.key = n.key;

    SELECT coalesce(array_agg(v_candidate[i] AND v_capped_until[i] IS NULL ORDER BY i), '{}')
    INTO v_allowed FROM generate_subscripts(p_users, 1) AS i;

    -- The credit of every allowed one-time send is taken now, and logged in the history.
    IF p_consent_kind = 'one_time' THEN
        UPDATE consent c SET credits = c.credits - 1, updated_at = now()
        FROM generate_subscripts(p_users, 1) AS i
        WHERE v_allowed[i] AND c.user_id = p_users[i] AND c.template_id = p_template;

        INSERT INTO consent_events
            (user_id, template_id, kind, result, via, source, delivery_id, event_id)
        SELECT p_users[i], p_template, 'one_time', 'consume', 'send', 'dispatcher', v_id[i],
               'delivery:' || v_id[i] || ':consume@' || now()  -- again after a put-back
        FROM generate_subscripts(p_users, 1) AS i WHERE v_allowed[i]
        ON CONFLICT DO NOTHING;
    END IF;

    -- Every claimed row not allowed gets its outcome now: skipped, or deferred to a moment
    -- within the plan's max_delay of its due time.
    WITH outcome AS (
        SELECT v_id[i] AS id, p_users[i] AS uid,
               CASE WHEN v_out[i] OR NOT v_consented[i] THEN 'skipped'
                    WHEN p_stop_status[i] IS NOT NULL THEN p_stop_status[i]
                    WHEN capped_defer THEN 'deferred'
                    ELSE 'skipped' END AS status,
               CASE WHEN v_out[i] THEN 'opted_out'
                    WHEN NOT v_consented[i] THEN 'no_consent'
                    WHEN p_stop_status[i] IS NOT NULL THEN p_stop_reason[i]
                    ELSE 'capped' END AS reason,
               CASE WHEN v_out[i] OR NOT v_consented[i] THEN NULL
                    WHEN p_stop_status[i] IS NOT NULL THEN p_stop_detail[i]
                    ELSE 'a frequency cap is full until '
                         || to_char(v_capped_until[i] AT TIME ZONE 'UTC',
                                    'YYYY-MM-DD HH24:MI "UTC"') END AS detail,
               CASE WHEN v_out[i] OR NOT v_consented[i] THEN NULL
                    WHEN p_stop_status[i] IS NOT NULL THEN p_defer_until[i]
                    WHEN capped_defer THEN v_capped_until[i] END AS until
        FROM generate_subscripts(p_users, 1) AS i,
             LATERAL (SELECT p_on_capped = 'defer'
                             AND v_capped_until[i] - p_due[i] <= p_max_delay AS capped_defer) AS x
        WHERE v_id[i] IS NOT NULL AND NOT v_allowed[i]
    ), recorded AS (
        UPDATE deliveries d
        SET status = o.status, reason = o.reason, detail = o.detail, defer_until = o.until,
            finished_at = CASE WHEN o.status = 'deferred' THEN NULL ELSE now() END
        FROM outcome o
        WHERE d.id = o.id
    )
    SELECT coalesce(array_agg(o.id), '{}'), coalesce(array_agg(o.uid), '{}'),
           coalesce(array_agg(o.status), '{}'), coalesce(array_agg(o.reason), '{}')
    INTO v_refused_ids, v_refused_users, v_refused_status, v_refused_reason
    FROM outcome o;

    RETURN QUERY
        SELECT v_id[i], p_users[i], 'pending', NULL::text
        FROM generate_subscripts(p_users, 1) AS i WHERE v_allowed[i]
        UNION ALL
        SELECT * FROM unnest(v_refused_ids, v_refused_users, v_refused_status, v_refused_reason);
END;
$$;
