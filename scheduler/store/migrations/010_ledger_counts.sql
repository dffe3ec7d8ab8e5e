-- Ledger counts (issue 14 part 2): what `reminders status`, /v1/plans and /v1/plans/{id} show
-- of the ledger, read from aggregates instead of the whole table, so they cost the same at 100
-- million rows as at 1,000. Read by scheduler/store/status.py.
--
-- Counts by (plan, due hour in UTC, status, reason): a day is the sum of its hours, and an hour
-- is fine enough that the rolling 24-hour and 7-day windows are exact with a read of the ledger
-- limited to what is due after a window's edge within the edge's hour (delivery_outcomes_v1).
--
-- Statement-level triggers with transition tables append one signed delta per (plan, hour,
-- status, reason) a statement changed to delivery_counts_delta: an append-only heap without
-- indexes, so writers never wait for each other (no hot counter row, nothing serializes
-- replicas) and a batch of 500 claims or results adds one or two rows. roll_up_delivery_counts_v1
-- (the daemon, every sweep period; readers before they read) folds them into delivery_counts in
-- one transaction. Readers read delivery_counts plus the deltas not yet folded: always exact.
--
-- Every change to the ledger is covered: INSERT (ON CONFLICT DO NOTHING inserts only what it
-- inserted; ON CONFLICT DO UPDATE fires the UPDATE trigger with the rows it updated), COPY,
-- UPDATE (whatever the columns: a trigger with transition tables cannot name columns, and an
-- update that moves no count nets to nothing), DELETE, and TRUNCATE (the counts go with it).
-- Dropping or detaching a partition (a prune, part 1 of the issue) fires none of them, so the
-- counts keep what the prune dropped.

-- NULL reasons are stored as '' (a key column cannot be NULL on PostgreSQL 14) and read back as
-- NULL; no writer records an empty reason.
CREATE TABLE delivery_counts (
    plan_id  text NOT NULL,
    due_hour timestamptz NOT NULL,
    status   text NOT NULL,
    reason   text NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (plan_id, due_hour, status, reason)
);

CREATE TABLE delivery_counts_delta (
    plan_id  text NOT NULL,
    due_hour timestamptz NOT NULL,
    status   text NOT NULL,
    reason   text NOT NULL,
    n        bigint NOT NULL
);

-- "Last errors" of a plan, newest first, found directly (the primary key walked backwards
-- discarded every other row of the ledger on the way).
CREATE INDEX deliveries_errors ON deliveries (plan_id, id) WHERE status IN ('failed', 'unknown');

CREATE FUNCTION delivery_counts_inserted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_counts_delta (plan_id, due_hour, status, reason, n)
    SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), count(*)
    FROM new_rows GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END;
$$;

CREATE FUNCTION delivery_counts_updated_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_counts_delta (plan_id, due_hour, status, reason, n)
    SELECT plan_id, due_hour, status, reason, sum(n)
    FROM (SELECT plan_id, date_trunc('hour', due_at, 'UTC') AS due_hour, status,
                 coalesce(reason, '') AS reason, 1 AS n FROM new_rows
          UNION ALL
          SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), -1
          FROM old_rows) AS moved
    GROUP BY 1, 2, 3, 4
    HAVING sum(n) <> 0;  -- an update of other columns (claimed_by, push_*) adds nothing
    RETURN NULL;
END;
$$;

CREATE FUNCTION delivery_counts_deleted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_counts_delta (plan_id, due_hour, status, reason, n)
    SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), -count(*)
    FROM old_rows GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END;
$$;

CREATE FUNCTION delivery_counts_truncated_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(72410010);  -- after a roll-up under way, not beside it
    DELETE FROM delivery_counts;
    DELETE FROM delivery_counts_delta;
    RETURN NULL;
END;
$$;

-- Created before the backfill: CREATE TRIGGER locks out writers of the ledger until this
-- migration commits, so the backfill reads a ledger nobody changes meanwhile.
CREATE TRIGGER deliveries_counts_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_inserted_v1();
CREATE TRIGGER deliveries_counts_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_updated_v1();
CREATE TRIGGER deliveries_counts_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_deleted_v1();
CREATE TRIGGER deliveries_counts_truncate AFTER TRUNCATE ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_truncated_v1();

INSERT INTO delivery_counts (plan_id, due_hour, status, reason, n)
SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), count(*)
FROM deliveries GROUP BY 1, 2, 3, 4;

-- Folds every delta committed so far into delivery_counts, in one transaction (the deltas are
-- deleted as they are added), and returns how many delta rows it folded. One roll-up at a time:
-- another caller meanwhile returns -1 at once (readers add the deltas themselves, so nothing
-- waits for it). A count that reaches 0 is deleted.
CREATE FUNCTION roll_up_delivery_counts_v1() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_folded int;
    v_emptied delivery_counts[];
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
    RETURN v_folded;
END;
$$;

-- The ledger rows due by p_now of one plan (or every plan: p_plan NULL) by (plan, status,
-- reason): d1 / d7 due in the last 24 hours / 7 days, total all of them; exactly what
--     count(*) FILTER (WHERE due_at > p_now - interval '24 hours') ... WHERE due_at <= p_now
-- over the ledger would say. Whole hours come from the counts (and the deltas not yet folded);
-- an hour a window edge falls in is counted whole on the side it starts, and corrected by the
-- rows due after the edge within that hour, read from the ledger by (plan_id, due_at).
CREATE FUNCTION delivery_outcomes_v1(p_plan text, p_now timestamptz)
RETURNS TABLE (plan_id text, status text, reason text, d1 bigint, d7 bigint, total bigint)
LANGUAGE sql STABLE AS $$
    WITH edge AS (
        SELECT p_now - interval '24 hours' AS l1, p_now - interval '7 days' AS l7,
               date_trunc('hour', p_now, 'UTC') AS h_now,
               date_trunc('hour', p_now - interval '24 hours', 'UTC') AS h1,
               date_trunc('hour', p_now - interval '7 days', 'UTC') AS h7
    ), counted AS (
        SELECT c.plan_id, c.due_hour, c.status, c.reason, c.n FROM delivery_counts c
        WHERE p_plan IS NULL OR c.plan_id = p_plan
        UNION ALL
        SELECT c.plan_id, c.due_hour, c.status, c.reason, c.n FROM delivery_counts_delta c
        WHERE p_plan IS NULL OR c.plan_id = p_plan
    ), hours AS (
        SELECT c.plan_id, c.status, c.reason,
               coalesce(sum(c.n) FILTER (WHERE c.due_hour > e.h1), 0) AS d1,
               coalesce(sum(c.n) FILTER (WHERE c.due_hour > e.h7), 0) AS d7,
               sum(c.n) AS total
        FROM counted c, edge e WHERE c.due_hour <= e.h_now
        GROUP BY 1, 2, 3
    ), edges AS (
        -- Due after an edge within its hour: in d1 / d7 though their hour is not (h1, h7), or
        -- not due yet though their hour is (h_now). The bounds are written out (not taken from
        -- `edge`) so that the planner sees them and reads each plan's rows by (plan_id, due_at).
        SELECT d.plan_id, d.status, coalesce(d.reason, '') AS reason,
               count(*) FILTER (WHERE d.due_at > e.l1 AND d.due_at < e.h1 + interval '1 hour')
               - count(*) FILTER (WHERE d.due_at > p_now) AS d1,
               count(*) FILTER (WHERE d.due_at > e.l7 AND d.due_at < e.h7 + interval '1 hour')
               - count(*) FILTER (WHERE d.due_at > p_now) AS d7,
               - count(*) FILTER (WHERE d.due_at > p_now) AS total
        FROM edge e
        CROSS JOIN (SELECT DISTINCT c.plan_id FROM counted c) AS p
        CROSS JOIN LATERAL (
            SELECT d.plan_id, d.status, d.reason, d.due_at FROM deliveries d
            WHERE d.plan_id = p.plan_id
              AND ((d.due_at > p_now - interval '24 hours'
                    AND d.due_at < date_trunc('hour', p_now - interval '24 hours', 'UTC')
                                   + interval '1 hour')
                   OR (d.due_at > p_now - interval '7 days'
                       AND d.due_at < date_trunc('hour', p_now - interval '7 days', 'UTC')
                                      + interval '1 hour')
                   OR (d.due_at > p_now
                       AND d.due_at < date_trunc('hour', p_now, 'UTC') + interval '1 hour'))
            OFFSET 0  -- keeps it a loop over the plans, each an index scan
        ) AS d
        GROUP BY 1, 2, 3
    )
    SELECT plan_id, status, nullif(reason, ''), sum(d1)::bigint, sum(d7)::bigint,
           sum(total)::bigint
    FROM (SELECT * FROM hours UNION ALL SELECT * FROM edges) AS both_
    GROUP BY 1, 2, 3
    HAVING sum(total) > 0
$$;
