-- Opens in monthly partitions on opened_at, like the ledger (014): they grow with traffic (up to
-- one a send), and retention drops a month of them whole (`reminders ledger prune`).
--
-- ensure_month_partitions is 014's ensure_ledger_partitions for any table partitioned by month on
-- a timestamptz column: partitions TABLE_yYYYYmMM from the month of `p_from` (default: now) to
-- `p_months_ahead` months after this one, a DEFAULT partition so an insert never fails, and a
-- month whose rows reached DEFAULT moved into its own new partition. ensure_ledger_partitions
-- now makes the ledger's and the opens' months together.
CREATE FUNCTION ensure_month_partitions(p_table text, p_column text, p_months_ahead int,
                                        p_from timestamptz DEFAULT NULL)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_this_month timestamptz := date_trunc('month', now(), 'UTC');
    v_default text := p_table || '_default';
    v_month timestamptz;
    v_name text;
    v_created text[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(72410014);  -- one replica at a time makes them
    IF to_regclass(v_default) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', v_default, p_table);
    END IF;
    FOR v_month IN EXECUTE format(
        'SELECT m FROM generate_series(date_trunc(''month'', least(coalesce($1, $2), $2), ''UTC''),'
        ' $2 + make_interval(months => $3), interval ''1 month'') AS m'
        ' UNION SELECT DISTINCT date_trunc(''month'', %I, ''UTC'') FROM %I ORDER BY 1',
        p_column, v_default) USING p_from, v_this_month, p_months_ahead
    LOOP
        v_name := p_table || '_' || to_char(v_month AT TIME ZONE 'UTC', '"y"YYYY"m"MM');
        CONTINUE WHEN to_regclass(v_name) IS NOT NULL;
        -- A partition cannot be created over rows in DEFAULT: they move into it first (between
        -- partitions, so the parent's triggers see nothing).
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       v_name, p_table);
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *)'
                       ' INSERT INTO %I SELECT * FROM moved', v_default, p_column, p_column, v_name)
            USING v_month, v_month + interval '1 month';
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       p_table, v_name, v_month, v_month + interval '1 month');
        v_created := v_created || v_name;
    END LOOP;
    RETURN v_created;
END;
$$;

DO $$
DECLARE
    v_oldest timestamptz;
BEGIN
    ALTER TABLE opens RENAME TO opens_unpartitioned;
    ALTER TABLE opens_unpartitioned RENAME CONSTRAINT opens_pkey TO opens_unpartitioned_pkey;
    ALTER INDEX opens_delivery RENAME TO opens_unpartitioned_delivery;
    ALTER INDEX opens_last RENAME TO opens_unpartitioned_last;
    ALTER INDEX opens_once RENAME TO opens_unpartitioned_once;
    ALTER INDEX opens_plan RENAME TO opens_unpartitioned_plan;
    ALTER SEQUENCE opens_id_seq OWNED BY NONE;
    CREATE TABLE opens (LIKE opens_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (opened_at);
    SELECT min(opened_at) INTO v_oldest FROM opens_unpartitioned;
    PERFORM ensure_month_partitions('opens', 'opened_at', 3, v_oldest);
    INSERT INTO opens SELECT * FROM opens_unpartitioned;
    DROP TABLE opens_unpartitioned;
    ALTER SEQUENCE opens_id_seq OWNED BY opens.id;
    ALTER TABLE opens ADD CONSTRAINT opens_pkey PRIMARY KEY (id, opened_at);
    CREATE INDEX opens_delivery ON opens (delivery_id) WHERE delivery_id IS NOT NULL;
    CREATE INDEX opens_last ON opens (user_id, opened_at DESC);
    CREATE UNIQUE INDEX opens_once ON opens (user_id, coalesce(delivery_id, 0), opened_at);
    CREATE INDEX opens_plan ON opens (plan_id, opened_at);
END;
$$;

CREATE OR REPLACE FUNCTION ensure_ledger_partitions(p_months_ahead int,
                                                    p_from timestamptz DEFAULT NULL)
RETURNS text[] LANGUAGE sql AS $$
    SELECT ensure_month_partitions('deliveries', 'key_at', p_months_ahead, p_from)
        || ensure_month_partitions('opens', 'opened_at', p_months_ahead, p_from)
$$;
