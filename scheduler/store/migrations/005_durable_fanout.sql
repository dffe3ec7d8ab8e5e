-- Durable fan-out (docs/operations.md, "Interruptions"): an occurrence is work in these tables,
-- split into chunks of the audience that any replica takes under its lease; a send is handed to
-- WeChat only after it is recorded in its replica's `in_flight`, so a crash makes `unknown` only
-- what may really have been sent, and everything else goes back to the pool.

-- One row per calendar occurrence that fired (or was caught up), keyed as the ledger keys it.
CREATE TABLE occurrences (
    id          bigserial PRIMARY KEY,
    plan_id     text NOT NULL REFERENCES plans (id),
    occurrence  text NOT NULL,  -- the ledger's key: the scheduled fire time, UTC ISO
    step        int NOT NULL,
    fire_time   timestamptz NOT NULL,
    total       int NOT NULL,   -- active enrolments when it was recorded
    state       text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    UNIQUE (plan_id, occurrence)
);
CREATE INDEX occurrences_running ON occurrences (fire_time) WHERE state = 'running';

-- A chunk is the users (after_user, last_user] of the plan's audience in user order (NULL: open
-- ended), so enrolments added later still fall in one. `cursor` is the last user whose batch was
-- claimed: a replica that takes the chunk over continues after it.
CREATE TABLE occurrence_chunks (
    id            bigserial PRIMARY KEY,
    occurrence_id bigint NOT NULL REFERENCES occurrences (id) ON DELETE CASCADE,
    after_user    text,
    last_user     text,
    cursor        text,
    state         text NOT NULL DEFAULT 'todo' CHECK (state IN ('todo', 'done')),
    owner         text,          -- the replica working on it; NULL: free to take
    takeovers     int NOT NULL DEFAULT 0,  -- times it was taken after another holder left it
    last_owner    text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX occurrence_chunks_todo ON occurrence_chunks (occurrence_id, id) WHERE state = 'todo';

-- The sends of this replica that may be on the wire: written before a send is handed to the
-- channel, in the same transaction as the results of the sends that finished.
ALTER TABLE replicas ADD COLUMN in_flight bigint[] NOT NULL DEFAULT '{}';

-- A late result of a send whose replica was given up for dead (its row became 'unknown') is
-- still the truth, and a result that may have reached WeChat ('unknown') keeps its credit. A
-- 'pending' result gives the row back to the pool (a plan's `resend_unknown`): its credit and cap
-- count stay taken, any replica sends it again.
CREATE OR REPLACE FUNCTION finish_deliveries(
    p_template text, p_consent_kind text,
    p_ids bigint[], p_statuses text[], p_reasons text[], p_errcodes int[], p_msgids bigint[],
    p_details text[], p_defer_until timestamptz[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_gone_ids bigint[];
    v_gone_users text[];
    v_refund_ids bigint[];
    v_refund_users text[];
BEGIN
    WITH done AS (
        UPDATE deliveries d
        SET status = r.status, reason = r.reason, errcode = r.errcode, msgid = r.msgid,
            detail = r.detail, defer_until = r.until,
            claimed_by = CASE WHEN r.status = 'pending' THEN NULL ELSE d.claimed_by END,
            finished_at = CASE WHEN r.status IN ('deferred', 'pending') THEN NULL ELSE now() END
        FROM unnest(p_ids, p_statuses, p_reasons, p_errcodes, p_msgids, p_details, p_defer_until)
             AS r (id, status, reason, errcode, msgid, detail, until)
        WHERE d.id = r.id AND (d.status = 'pending'
              OR (d.status = 'unknown' AND d.reason = 'crashed_in_flight'))
        RETURNING d.id, d.user_id, r.status, r.errcode
    )
    SELECT
        coalesce(array_agg(id) FILTER (WHERE errcode = 43101), '{}'),
        coalesce(array_agg(user_id) FILTER (WHERE errcode = 43101), '{}'),
        coalesce(array_agg(id) FILTER (WHERE status NOT IN ('sent', 'unknown', 'pending')
            AND errcode IS DISTINCT FROM 43101 AND p_consent_kind = 'one_time'), '{}'),
        coalesce(array_agg(user_id) FILTER (WHERE status NOT IN ('sent', 'unknown', 'pending')
            AND errcode IS DISTINCT FROM 43101 AND p_consent_kind = 'one_time'), '{}')
    INTO v_gone_ids, v_gone_users, v_refund_ids, v_refund_users
    FROM done;

    IF cardinality(v_gone_ids) > 0 THEN
        INSERT INTO consent (user_id, template_id)
        SELECT DISTINCT u, p_template FROM unnest(v_gone_users) AS u
        ON CONFLICT DO NOTHING;
        UPDATE consent c SET credits = 0, long_term = false, updated_at = now()
        WHERE c.template_id = p_template AND c.user_id = ANY (v_gone_users);
        INSERT INTO consent_events
            (user_id, template_id, kind, result, via, source, delivery_id, event_id)
        SELECT g.uid, p_template, p_consent_kind, 'exhausted', 'send', 'wechat:43101', g.id,
               'delivery:' || g.id || ':43101'
        FROM unnest(v_gone_ids, v_gone_users) AS g (id, uid)
        ON CONFLICT DO NOTHING;
    END IF;

    IF cardinality(v_refund_ids) > 0 THEN
        WITH refunded AS (
            UPDATE consent c SET credits = c.credits + r.n, updated_at = now()
            FROM (SELECT uid, count(*)::int AS n FROM unnest(v_refund_users) AS uid
                  WHERE NOT (uid = ANY (v_gone_users)) GROUP BY uid) AS r
            WHERE c.template_id = p_template AND c.user_id = r.uid
            RETURNING c.user_id
        )
        INSERT INTO consent_events
            (user_id, template_id, kind, result, via, source, delivery_id, event_id)
        SELECT f.uid, p_template, 'one_time', 'refund', 'send', 'dispatcher', f.id,
               'delivery:' || f.id || ':refund@' || now()  -- a row put back may be refunded again
        FROM unnest(v_refund_ids, v_refund_users) AS f (id, uid)
        WHERE f.uid IN (SELECT user_id FROM refunded)
        ON CONFLICT DO NOTHING;
    END IF;
END;
$$;

-- One round trip of the flight recorder: write the results of finished sends (grouped by
-- template and consent kind), and record which claimed rows go on the wire now. A row is
-- authorized only while it is still pending and claimed by this replica, under the lock of the
-- replica's row, which a recovery takes too: a send is either in `in_flight` before it leaves,
-- or given back to the pool and never sent by this replica.
CREATE FUNCTION record_flight_v1(
    p_replica text, p_still_in_flight bigint[], p_candidates bigint[],
    p_ids bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[],
    p_errcodes int[], p_msgids bigint[], p_details text[], p_defer_until timestamptz[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    v_group record;
    v_authorized bigint[];
BEGIN
    INSERT INTO replicas AS r (id, host, pid) VALUES (p_replica, '', 0)
    ON CONFLICT (id) DO UPDATE SET last_seen = greatest(r.last_seen, now());

    FOR v_group IN SELECT DISTINCT t, k FROM unnest(p_templates, p_kinds) AS g (t, k) LOOP
        PERFORM finish_deliveries(v_group.t, v_group.k,
            array_agg(id ORDER BY pos), array_agg(st ORDER BY pos), array_agg(rs ORDER BY pos),
            array_agg(ec ORDER BY pos), array_agg(mi ORDER BY pos), array_agg(dt ORDER BY pos),
            array_agg(du ORDER BY pos))
        FROM unnest(p_ids, p_templates, p_kinds, p_statuses, p_reasons, p_errcodes, p_msgids,
                    p_details, p_defer_until) WITH ORDINALITY
             AS f (id, t, k, st, rs, ec, mi, dt, du, pos)
        WHERE f.t = v_group.t AND f.k = v_group.k;
    END LOOP;

    SELECT coalesce(array_agg(d.id), '{}') INTO v_authorized
    FROM deliveries d
    WHERE d.id = ANY (p_candidates) AND d.status = 'pending' AND d.claimed_by = p_replica;

    UPDATE replicas SET in_flight = p_still_in_flight || v_authorized WHERE id = p_replica;
    RETURN v_authorized;
END;
$$;

-- A replica gone (its lease ran out) or restarting (p_dead_after NULL: its own rows): its sends
-- that may have been on the wire become 'unknown' (never resent: WeChat has no idempotency
-- key; unless their plan says `resend_unknown`), its other claimed rows go back to the pool
-- (pending, claimed by nobody) for any replica to send, and its chunks are free to take.
CREATE FUNCTION recover_replica_v1(p_replica text, p_dead_after interval)
RETURNS TABLE (unknown int, released int, chunks int)
LANGUAGE plpgsql AS $$
DECLARE
    v_in_flight bigint[];
    v_unknown int;
    v_released int;
    v_chunks int;
BEGIN
    SELECT r.in_flight INTO v_in_flight FROM replicas r
    WHERE r.id = p_replica AND (p_dead_after IS NULL OR r.last_seen < now() - p_dead_after)
    FOR UPDATE;
    IF NOT FOUND THEN
        IF p_dead_after IS NOT NULL
           AND EXISTS (SELECT 1 FROM replicas r WHERE r.id = p_replica) THEN
            RETURN;  -- alive
        END IF;
        v_in_flight := '{}';  -- no row: it never authorized a send
    END IF;

    UPDATE deliveries d SET status = 'unknown', reason = 'crashed_in_flight',
        detail = 'in flight when replica ' || p_replica || ' stopped', finished_at = now()
    WHERE d.status = 'pending' AND d.claimed_by = p_replica AND d.id = ANY (v_in_flight)
      AND NOT EXISTS (
          SELECT 1 FROM plans p
          JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version
          WHERE p.id = d.plan_id AND v.definition -> 'delivery' ->> 'resend_unknown' = 'true');
    GET DIAGNOSTICS v_unknown = ROW_COUNT;

    UPDATE deliveries d SET claimed_by = NULL
    WHERE d.status = 'pending' AND d.claimed_by = p_replica;
    GET DIAGNOSTICS v_released = ROW_COUNT;

    UPDATE occurrence_chunks c SET owner = NULL, last_owner = p_replica, updated_at = now()
    WHERE c.owner = p_replica AND c.state = 'todo';
    GET DIAGNOSTICS v_chunks = ROW_COUNT;

    UPDATE replicas r SET in_flight = '{}' WHERE r.id = p_replica;
    RETURN QUERY SELECT v_unknown, v_released, v_chunks;
END;
$$;
