-- Engagement counts (issue 14 part 2): the figures of `reminders status PLAN`, `reminders report`,
-- /v1/plans/{id} and the engagement gauges of /metrics read from aggregates, as migration 010
-- made the outcome counts, instead of every delivery the plan ever sent: the same cost at 100
-- million ledger rows as at 1,000. Read by scheduler/store/engagement.py.
--
-- A delivery counts when WeChat accepted it (status `sent`, or `failed` with reason
-- `push_failed`: accepted, then reported undelivered); it is `delivered` when WeChat's push said
-- so (push_errcode 0) and `opened` once an open names it: the first open now marks its delivery
-- (`opened_at`), so every count of a delivery is a function of its own row and the ledger's
-- statement triggers keep them, as 010's do: signed deltas per (plan, due quarter hour, plan
-- version, step, variant) appended to engagement_counts_delta, folded into engagement_counts
-- by the same roll-up as the outcome counts.
--
-- The due time is kept to the quarter hour (every time zone's offset is a whole number of
-- quarter hours, so a quarter lies within one local day anywhere): a quarter that holds none of
-- a reader's edges (the 24-hour and 7-day windows, the guard's windows, its judged spans, the
-- report's days) is on one side of each, and engagement_sent_v1 reads the few quarters that hold
-- an edge from the ledger itself, row by row, so every figure is exact.
ALTER TABLE deliveries ADD COLUMN opened_at timestamptz;  -- its first open (POST /v1/opens)

-- Every open that names a delivery marks it, whoever inserts it (a replica of the previous
-- release during a rolling upgrade too): the earliest open's time.
CREATE FUNCTION opens_mark_delivery_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE deliveries d SET opened_at = o.first
    FROM (SELECT delivery_id, min(opened_at) AS first FROM new_opens
          WHERE delivery_id IS NOT NULL GROUP BY 1) AS o
    WHERE d.id = o.delivery_id AND (d.opened_at IS NULL OR d.opened_at > o.first);
    RETURN NULL;
END;
$$;
CREATE TRIGGER opens_mark_delivery AFTER INSERT ON opens
    REFERENCING NEW TABLE AS new_opens
    FOR EACH STATEMENT EXECUTE FUNCTION opens_mark_delivery_v1();

UPDATE deliveries d SET opened_at = o.first
FROM (SELECT delivery_id, min(opened_at) AS first FROM opens
      WHERE delivery_id IS NOT NULL GROUP BY 1) AS o
WHERE d.id = o.delivery_id;

CREATE TABLE engagement_counts (
    plan_id      text NOT NULL,
    due_quarter  timestamptz NOT NULL,
    plan_version integer NOT NULL,
    step         integer NOT NULL,
    variant      text NOT NULL,  -- 'default' for a delivery without a variant
    sent         bigint NOT NULL,
    delivered    bigint NOT NULL,
    opened       bigint NOT NULL,
    PRIMARY KEY (plan_id, due_quarter, plan_version, step, variant)
);

CREATE TABLE engagement_counts_delta (
    plan_id      text NOT NULL,
    due_quarter  timestamptz NOT NULL,
    plan_version integer NOT NULL,
    step         integer NOT NULL,
    variant      text NOT NULL,
    sent         bigint NOT NULL,
    delivered    bigint NOT NULL,
    opened       bigint NOT NULL
);

-- The quarter hour a due time falls in (UTC-aligned).
CREATE FUNCTION due_quarter_v1(p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin('15 minutes', p_at, timestamptz '2000-01-01 00:00+00')
$$;

CREATE FUNCTION engagement_counts_inserted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engagement_counts_delta
    SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
           count(*), count(*) FILTER (WHERE push_errcode = 0),
           count(*) FILTER (WHERE opened_at IS NOT NULL)
    FROM new_rows WHERE status = 'sent' OR reason = 'push_failed'
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$$;

CREATE FUNCTION engagement_counts_updated_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engagement_counts_delta
    SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
           sum(n), coalesce(sum(n) FILTER (WHERE push_errcode = 0), 0),
           coalesce(sum(n) FILTER (WHERE opened_at IS NOT NULL), 0)
    FROM (SELECT plan_id, due_at, plan_version, step, variant, push_errcode, opened_at, 1 AS n
          FROM new_rows WHERE status = 'sent' OR reason = 'push_failed'
          UNION ALL
          SELECT plan_id, due_at, plan_version, step, variant, push_errcode, opened_at, -1
          FROM old_rows WHERE status = 'sent' OR reason = 'push_failed') AS moved
    GROUP BY 1, 2, 3, 4, 5
    -- an update that moves no count (a claim, a skip, most results) adds nothing
    HAVING sum(n) <> 0 OR coalesce(sum(n) FILTER (WHERE push_errcode = 0), 0) <> 0
        OR coalesce(sum(n) FILTER (WHERE opened_at IS NOT NULL), 0) <> 0;
    RETURN NULL;
END;
$$;

CREATE FUNCTION engagement_counts_deleted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engagement_counts_delta
    SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
           -count(*), -count(*) FILTER (WHERE push_errcode = 0),
           -count(*) FILTER (WHERE opened_at IS NOT NULL)
    FROM old_rows WHERE status = 'sent' OR reason = 'push_failed'
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$$;

CREATE FUNCTION engagement_counts_truncated_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(72410010);  -- after a roll-up under way, not beside it
    DELETE FROM engagement_counts;
    DELETE FROM engagement_counts_delta;
    RETURN NULL;
END;
$$;

-- Created before the backfill: writers of the ledger wait until this migration commits.
CREATE TRIGGER deliveries_engagement_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_inserted_v1();
CREATE TRIGGER deliveries_engagement_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_updated_v1();
CREATE TRIGGER deliveries_engagement_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_deleted_v1();
CREATE TRIGGER deliveries_engagement_truncate AFTER TRUNCATE ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_truncated_v1();

INSERT INTO engagement_counts
SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
       count(*), count(*) FILTER (WHERE push_errcode = 0),
       count(*) FILTER (WHERE opened_at IS NOT NULL)
FROM deliveries WHERE status = 'sent' OR reason = 'push_failed'
GROUP BY 1, 2, 3, 4, 5;

-- 010's roll-up folds the engagement deltas too, in the same transaction (one lock, one call
-- from the daemon and the readers); it returns how many delta rows it folded of both.
CREATE OR REPLACE FUNCTION roll_up_delivery_counts_v1() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_folded int;
    v_engaged int;
    v_emptied delivery_counts[];
    v_engaged_emptied engagement_counts[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(72410010) THEN  -- the counts' key (migrations take 72410001)
        RETURN -1;
    END IF;
    WITH folded AS (
        DELETE FROM delivery_counts_delta RETURNING plan_id, due_hour, status, reason, n
    ), summed AS (
        SELECT plan_id, due_hour, status, reason, sum(n)::bigint AS n, count(*) AS deltas
        FROM folded GROUP BY 1, 2, 3, 4
    ), upserted AS (
        INSERT INTO delivery_counts AS c (plan_id, due_hour, status, reason, n)
        SELECT plan_id, due_hour, status, reason, n FROM summed ORDER BY 1, 2, 3, 4
        ON CONFLICT (plan_id, due_hour, status, reason) DO UPDATE SET n = c.n + excluded.n
        RETURNING c.*
    )
    SELECT (SELECT coalesce(sum(deltas), 0)::int FROM summed),
           (SELECT coalesce(array_agg(ROW(u.plan_id, u.due_hour, u.status, u.reason, u.n)
                                      ::delivery_counts), '{}')
            FROM upserted u WHERE u.n = 0)
    INTO v_folded, v_emptied;
    DELETE FROM delivery_counts c USING unnest(v_emptied) AS z
    WHERE c.plan_id = z.plan_id AND c.due_hour = z.due_hour AND c.status = z.status
      AND c.reason = z.reason AND c.n = 0;

    WITH folded AS (
        DELETE FROM engagement_counts_delta RETURNING *
    ), summed AS (
        SELECT plan_id, due_quarter, plan_version, step, variant, sum(sent)::bigint AS sent,
               sum(delivered)::bigint AS delivered, sum(opened)::bigint AS opened,
               count(*) AS deltas
        FROM folded GROUP BY 1, 2, 3, 4, 5
    ), upserted AS (
        INSERT INTO engagement_counts AS c
        SELECT plan_id, due_quarter, plan_version, step, variant, sent, delivered, opened
        FROM summed ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (plan_id, due_quarter, plan_version, step, variant) DO UPDATE
            SET sent = c.sent + excluded.sent, delivered = c.delivered + excluded.delivered,
                opened = c.opened + excluded.opened
        RETURNING c.*
    )
    SELECT (SELECT coalesce(sum(deltas), 0)::int FROM summed),
           (SELECT coalesce(array_agg(ROW(u.plan_id, u.due_quarter, u.plan_version, u.step,
                                          u.variant, u.sent, u.delivered, u.opened)
                                      ::engagement_counts), '{}')
            FROM upserted u WHERE u.sent = 0)
    INTO v_engaged, v_engaged_emptied;
    DELETE FROM engagement_counts c USING unnest(v_engaged_emptied) AS z
    WHERE c.plan_id = z.plan_id AND c.due_quarter = z.due_quarter
      AND c.plan_version = z.plan_version AND c.step = z.step AND c.variant = z.variant
      AND c.sent = 0;
    RETURN v_folded + v_engaged;
END;
$$;

-- A plan's deliveries WeChat accepted, as rows the engagement readers filter and group by due
-- time exactly as they would the ledger's own rows: one row per (quarter, version, step,
-- variant) for each quarter hour that holds none of `p_edges` (its due_at is the quarter's
-- start, which is on the same side of every edge as all of the quarter's deliveries), and the
-- ledger's deliveries themselves, grouped by their exact due time, in the quarters that hold one.
CREATE FUNCTION engagement_sent_v1(p_plan text, p_edges timestamptz[])
RETURNS TABLE (due_at timestamptz, plan_version integer, step integer, variant text,
               sent bigint, delivered bigint, opened bigint)
LANGUAGE sql STABLE AS $$
    WITH cut AS (
        SELECT DISTINCT due_quarter_v1(e) AS q FROM unnest(p_edges) AS e WHERE e IS NOT NULL
    ), counted AS (
        SELECT c.due_quarter, c.plan_version, c.step, c.variant, c.sent, c.delivered, c.opened
        FROM engagement_counts c WHERE c.plan_id = p_plan
        UNION ALL
        SELECT c.due_quarter, c.plan_version, c.step, c.variant, c.sent, c.delivered, c.opened
        FROM engagement_counts_delta c WHERE c.plan_id = p_plan
    )
    SELECT c.due_quarter, c.plan_version, c.step, c.variant, sum(c.sent)::bigint,
           sum(c.delivered)::bigint, sum(c.opened)::bigint
    FROM counted c WHERE c.due_quarter NOT IN (SELECT q FROM cut)
    GROUP BY 1, 2, 3, 4
    HAVING sum(c.sent) <> 0
    UNION ALL
    SELECT d.due_at, d.plan_version, d.step, coalesce(d.variant, 'default'), count(*),
           count(*) FILTER (WHERE d.push_errcode = 0),
           count(*) FILTER (WHERE d.opened_at IS NOT NULL)
    FROM cut CROSS JOIN LATERAL (
        SELECT * FROM deliveries d
        WHERE d.plan_id = p_plan AND d.due_at >= cut.q AND d.due_at < cut.q + interval '15 minutes'
          AND (d.status = 'sent' OR d.reason = 'push_failed')
        OFFSET 0  -- each quarter an index scan on (plan_id, due_at)
    ) AS d
    GROUP BY 1, 2, 3, 4
$$;
