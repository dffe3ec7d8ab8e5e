-- The ledger in monthly partitions (issue 14 part 1): old months go with a DROP of their
-- partition (`reminders ledger prune`, scheduler/store/ledger.py), not a DELETE that rewrites and
-- bloats the table, and a month is exported first if asked.
--
-- The partition key is `key_at`, the time that identifies a ledger key: `ledger_key_at` of the
-- row's occurrence and due time. On a partitioned table a unique constraint must include the
-- partition key, so the never-twice key becomes (plan_id, occurrence, user_id, key_at); key_at
-- must therefore be a function of the key alone, or a double fire, a second replica or a
-- deferred row claimed again would not meet the same row. It is the due time (a calendar
-- occurrence's rows are all due at its fire time, the key itself; a relative step at the
-- timeline's own due time, so a re-enrolment with a new start is a new timeline, as
-- docs/operations.md says), except for an adapt rule's extra step keyed by the start of an
-- inactivity period (`extra:NAME:since:TIME`, scheduler/domain/adapt.py): later steps of that
-- period claim it with their own due times and must meet one row, so its key_at is that TIME.
--
-- This migration copies the ledger into the partitioned table (time in proportion to its rows)
-- and changes the ON CONFLICT target of every insert: stop every replica for this upgrade
-- (docs/operations.md, "Rolling upgrades"). The count triggers of migration 010 move to the
-- partitioned table after the copy, so delivery_counts does not count the copied rows twice.
-- opens.delivery_id loses its foreign key: one to a partitioned table must name the partition
-- key too, and an open outlives a pruned month of the ledger anyway.

CREATE FUNCTION ledger_key_at(p_occurrence text, p_due_at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_occurrence LIKE 'extra:%:since:%'
                THEN substring(p_occurrence FROM ':since:([0-9]{4}-[0-9]{2}-[0-9]{2}T[^:]*:.*)$')
                         ::timestamptz
                ELSE p_due_at END
$$;

-- The month partitions from the month of `p_from` (default: now) to `p_months_ahead` months
-- after this one, named deliveries_yYYYYmMM, and the DEFAULT partition that takes a row of any
-- month without one (an insert never fails for lack of a partition). Rows of a month that
-- reached DEFAULT move into that month's new partition. Returns the partitions created.
CREATE FUNCTION ensure_ledger_partitions(p_months_ahead int, p_from timestamptz DEFAULT NULL)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_this_month timestamptz := date_trunc('month', now(), 'UTC');
    v_month timestamptz;
    v_name text;
    v_created text[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(72410014);  -- one replica at a time makes them
    IF to_regclass('deliveries_default') IS NULL THEN
        CREATE TABLE deliveries_default PARTITION OF deliveries DEFAULT;
    END IF;
    -- The months from p_from's (or this one) to p_months_ahead after this one, and every month
    -- a row in DEFAULT belongs to (a far-off due time makes its own month, not all between).
    FOR v_month IN
        SELECT m FROM generate_series(
            date_trunc('month', least(coalesce(p_from, v_this_month), v_this_month), 'UTC'),
            v_this_month + make_interval(months => p_months_ahead), interval '1 month') AS m
        UNION
        SELECT DISTINCT date_trunc('month', key_at, 'UTC') FROM deliveries_default
        ORDER BY 1
    LOOP
        v_name := 'deliveries_' || to_char(v_month AT TIME ZONE 'UTC', '"y"YYYY"m"MM');
        IF to_regclass(v_name) IS NULL THEN
            IF EXISTS (SELECT 1 FROM deliveries_default
                       WHERE key_at >= v_month AND key_at < v_month + interval '1 month') THEN
                -- A partition cannot be created over rows in DEFAULT: move them into it first
                -- (the rows move between partitions, so the ledger's count triggers, which
                -- are the parent's, see nothing).
                EXECUTE format('CREATE TABLE %I (LIKE deliveries INCLUDING DEFAULTS'
                               ' INCLUDING CONSTRAINTS)', v_name);
                EXECUTE format('WITH moved AS (DELETE FROM deliveries_default WHERE key_at >= %L'
                               ' AND key_at < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
                               v_month, v_month + interval '1 month', v_name);
                EXECUTE format('ALTER TABLE deliveries ATTACH PARTITION %I'
                               ' FOR VALUES FROM (%L) TO (%L)',
                               v_name, v_month, v_month + interval '1 month');
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF deliveries'
                               ' FOR VALUES FROM (%L) TO (%L)',
                               v_name, v_month, v_month + interval '1 month');
            END IF;
            v_created := v_created || v_name;
        END IF;
    END LOOP;
    RETURN v_created;
END;
$$;

DO $$
DECLARE
    v_index record;
    v_indexes text[] := '{}';
    v_trigger record;
    v_triggers text[] := '{}';
    v_def text;
    v_oldest timestamptz;
BEGIN
    ALTER TABLE deliveries RENAME TO deliveries_unpartitioned;
    ALTER TABLE deliveries_unpartitioned RENAME CONSTRAINT deliveries_pkey
        TO deliveries_unpartitioned_pkey;
    ALTER TABLE deliveries_unpartitioned RENAME CONSTRAINT
        deliveries_plan_id_occurrence_user_id_key TO deliveries_unpartitioned_key;
    ALTER TABLE opens DROP CONSTRAINT IF EXISTS opens_delivery_id_fkey;
    ALTER SEQUENCE deliveries_id_seq OWNED BY NONE;

    -- Every other index and trigger of the ledger, as it is now, to be made again on the
    -- partitioned table after the copy (the indexes are dropped first: their names are free).
    FOR v_index IN
        SELECT i.indexrelid::regclass AS name, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i WHERE i.indrelid = 'deliveries_unpartitioned'::regclass
          AND NOT i.indisprimary AND NOT i.indisunique
    LOOP
        v_indexes := v_indexes || replace(v_index.def, 'ON public.deliveries_unpartitioned ',
                                          'ON public.deliveries ');
        EXECUTE format('DROP INDEX %s', v_index.name);
    END LOOP;
    FOR v_trigger IN
        SELECT pg_get_triggerdef(t.oid) AS def FROM pg_trigger t
        WHERE t.tgrelid = 'deliveries_unpartitioned'::regclass AND NOT t.tgisinternal
    LOOP
        v_triggers := v_triggers || replace(v_trigger.def, 'ON public.deliveries_unpartitioned ',
                                            'ON public.deliveries ');
    END LOOP;

    CREATE TABLE deliveries (
        LIKE deliveries_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
        key_at timestamptz NOT NULL
    ) PARTITION BY RANGE (key_at);

    SELECT min(ledger_key_at(occurrence, due_at)) INTO v_oldest FROM deliveries_unpartitioned;
    PERFORM ensure_ledger_partitions(3, v_oldest);
    INSERT INTO deliveries SELECT u.*, ledger_key_at(u.occurrence, u.due_at)
    FROM deliveries_unpartitioned u;
    DROP TABLE deliveries_unpartitioned;
    ALTER SEQUENCE deliveries_id_seq OWNED BY deliveries.id;

    ALTER TABLE deliveries ADD CONSTRAINT deliveries_pkey PRIMARY KEY (id, key_at);
    ALTER TABLE deliveries ADD CONSTRAINT deliveries_plan_id_occurrence_user_id_key
        UNIQUE (plan_id, occurrence, user_id, key_at);
    FOREACH v_def IN ARRAY v_indexes LOOP
        EXECUTE v_def;
    END LOOP;
    FOREACH v_def IN ARRAY v_triggers LOOP
        EXECUTE v_def;
    END LOOP;
END;
$$;

-- The claims insert with the row's key_at, and meet a row already there on the whole key.
CREATE OR REPLACE FUNCTION gate_v2_claim_rows(p_batch gate_batch_v2, p_rows gate_row_v2[])
RETURNS bigint[] LANGUAGE sql AS $$
    WITH input AS (SELECT * FROM gate_v2_rows(p_rows)),
    claimed AS (
        INSERT INTO deliveries AS d
            (plan_id, plan_version, occurrence, user_id, step, due_at, status, message,
             claimed_by, variant, key_at)
        SELECT (p_batch).plan_id, (p_batch).version, i.occurrence, i.user_id, i.step, i.due_at,
               'pending', i.message, (p_batch).replica, i.variant,
               ledger_key_at(i.occurrence, i.due_at)
        FROM input i
        ON CONFLICT (plan_id, occurrence, user_id, key_at) DO UPDATE
            SET status = 'pending', reason = NULL, detail = NULL, defer_until = NULL,
                claimed_by = excluded.claimed_by, claimed_at = now()
            WHERE d.status = 'deferred'
        RETURNING d.id, d.occurrence, d.user_id
    )
    SELECT coalesce(array_agg(c.id ORDER BY i.pos), '{}')
    FROM input i LEFT JOIN claimed c ON c.occurrence = i.occurrence AND c.user_id = i.user_id
$$;

-- The previous release's claim (v1), called during a rolling upgrade: the same change.
CREATE OR REPLACE FUNCTION public.claim_deliveries(p_plan text, p_version integer, p_template text, p_consent_kind text, p_replica text, p_occurrences text[], p_users text[], p_steps integer[], p_due timestamp with time zone[], p_messages jsonb[], p_stop_status text[], p_stop_reason text[], p_stop_detail text[], p_defer_until timestamp with time zone[], p_cap_rows integer[], p_cap_keys text[], p_cap_limits integer[], p_cap_resets timestamp with time zone[], p_on_capped text, p_max_delay interval)
 RETURNS TABLE(delivery_id bigint, user_id text, status text, reason text)
 LANGUAGE plpgsql
AS $function$
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
            (plan_id, plan_version, occurrence, user_id, step, due_at, status, message, claimed_by,
             key_at)
        SELECT p_plan, p_version, occ, uid, step, due, 'pending', msg, p_replica,
               ledger_key_at(occ, due) FROM input
        ON CONFLICT (plan_id, occurrence, user_id, key_at) DO UPDATE
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
$function$;
