-- The database schema after every migration, generated from the catalogs of a freshly
-- migrated database (scheduler/store/schema.py). Do not edit: after adding or changing
-- a migration, regenerate it with
--     .venv/bin/python -m scheduler.store.schema > scheduler/store/schema.sql
-- tests/integration/test_schema_snapshot.py fails when it is out of date.
--
-- PostgreSQL 16 (the catalogs print some expressions differently from one major
-- version to another).
--
-- Migrations:
--   001_foundation.sql
--   002_ingestion.sql
--   003_operations.sql
--   004_rules_gate.sql
--   005_durable_fanout.sql
--   006_push_replay.sql
--   007_send_rate.sql
--   008_typed_claim.sql
--   009_engagement.sql
--   010_ledger_counts.sql
--   011_activity.sql
--   014_ledger_partitions.sql
--   015_opens_partitions.sql
--   016_engagement_counts.sql
--   017_drop_plan_status_index.sql
--
-- Functions:
--   claim_deliveries(p_plan text, p_version integer, p_template text, p_consent_kind text,
--       p_replica text, p_occurrences text[], p_users text[], p_steps integer[], p_due timestamp
--       with time zone[], p_messages jsonb[], p_stop_status text[], p_stop_reason text[],
--       p_stop_detail text[], p_defer_until timestamp with time zone[], p_cap_rows integer[],
--       p_cap_keys text[], p_cap_limits integer[], p_cap_resets timestamp with time zone[],
--       p_on_capped text, p_max_delay interval) -> TABLE(delivery_id bigint, user_id text, status
--       text, reason text)
--   claim_deliveries_v2(p_batch gate_batch_v2, p_rows gate_row_v2[]) -> TABLE(delivery_id bigint,
--       user_id text, status text, reason text)
--   delivery_counts_deleted_v1() -> trigger
--   delivery_counts_inserted_v1() -> trigger
--   delivery_counts_truncated_v1() -> trigger
--   delivery_counts_updated_v1() -> trigger
--   delivery_outcomes_v1(p_plan text, p_now timestamp with time zone) -> TABLE(plan_id text, status
--       text, reason text, d1 bigint, d7 bigint, total bigint)
--   due_quarter_v1(p_at timestamp with time zone) -> timestamp with time zone
--   engagement_counts_deleted_v1() -> trigger
--   engagement_counts_inserted_v1() -> trigger
--   engagement_counts_truncated_v1() -> trigger
--   engagement_counts_updated_v1() -> trigger
--   engagement_sent_v1(p_plan text, p_edges timestamp with time zone[]) -> TABLE(due_at timestamp
--       with time zone, plan_version integer, step integer, variant text, sent bigint, delivered
--       bigint, opened bigint)
--   ensure_ledger_partitions(p_months_ahead integer, p_from timestamp with time zone) -> text[]
--   ensure_month_partitions(p_table text, p_column text, p_months_ahead integer, p_from timestamp
--       with time zone) -> text[]
--   finish_deliveries(p_template text, p_consent_kind text, p_ids bigint[], p_statuses text[],
--       p_reasons text[], p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until
--       timestamp with time zone[]) -> void
--   gate_v2_cap_uses(p_rows gate_row_v2[], p_candidate boolean[]) -> TABLE(pos integer, key text,
--       cap_limit integer, resets_at timestamp with time zone)
--   gate_v2_claim_rows(p_batch gate_batch_v2, p_rows gate_row_v2[]) -> bigint[]
--   gate_v2_consented(p_batch gate_batch_v2, p_rows gate_row_v2[], p_open boolean[]) -> boolean[]
--   gate_v2_count_caps(p_rows gate_row_v2[], p_candidate boolean[]) -> timestamp with time zone[]
--   gate_v2_opted_out(p_plan text, p_rows gate_row_v2[], p_ids bigint[]) -> boolean[]
--   gate_v2_record_refusals(p_batch gate_batch_v2, p_rows gate_row_v2[], p_ids bigint[], p_out
--       boolean[], p_consented boolean[], p_capped_until timestamp with time zone[], p_allowed
--       boolean[]) -> TABLE(delivery_id bigint, user_id text, status text, reason text)
--   gate_v2_rows(p_rows gate_row_v2[]) -> TABLE(pos integer, occurrence text, user_id text, step
--       integer, due_at timestamp with time zone, message jsonb, stop gate_stop_v2, caps
--       gate_cap_v2[], variant text)
--   gate_v2_take_credits(p_batch gate_batch_v2, p_rows gate_row_v2[], p_ids bigint[], p_allowed
--       boolean[]) -> void
--   ledger_key_at(p_occurrence text, p_due_at timestamp with time zone) -> timestamp with time zone
--   opens_mark_delivery_v1() -> trigger
--   record_flight_v1(p_replica text, p_still_in_flight bigint[], p_candidates bigint[], p_ids
--       bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[],
--       p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until timestamp with
--       time zone[]) -> bigint[]
--   record_flight_v2(p_replica text, p_still_in_flight bigint[], p_candidates bigint[], p_ids
--       bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[],
--       p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until timestamp with
--       time zone[], p_app text, p_rate double precision) -> TABLE(authorized bigint[], waiting
--       bigint[])
--   recover_replica_v1(p_replica text, p_dead_after interval) -> TABLE(unknown integer, released
--       integer, chunks integer)
--   roll_up_delivery_counts_v1() -> integer

-- ------------------------------------------------------------------------------------------------
-- Extensions
-- ------------------------------------------------------------------------------------------------

-- (none)

-- ------------------------------------------------------------------------------------------------
-- Types
-- ------------------------------------------------------------------------------------------------

CREATE TYPE gate_batch_v2 AS (
    plan_id text,
    version integer,
    template_id text,
    consent_kind text,
    replica text,
    on_capped text,
    max_delay interval
);

CREATE TYPE gate_cap_v2 AS (
    key text,
    cap_limit integer,
    resets_at timestamp with time zone
);

CREATE TYPE gate_row_v2 AS (
    occurrence text,
    user_id text,
    step integer,
    due_at timestamp with time zone,
    message jsonb,
    stop gate_stop_v2,
    caps gate_cap_v2[],
    variant text
);

CREATE TYPE gate_stop_v2 AS (
    status text,
    reason text,
    detail text,
    defer_until timestamp with time zone
);

-- ------------------------------------------------------------------------------------------------
-- Sequences
-- ------------------------------------------------------------------------------------------------

CREATE SEQUENCE consent_events_id_seq AS bigint OWNED BY consent_events.id;

CREATE SEQUENCE deliveries_id_seq AS bigint OWNED BY deliveries.id;

CREATE SEQUENCE occurrence_chunks_id_seq AS bigint OWNED BY occurrence_chunks.id;

CREATE SEQUENCE occurrences_id_seq AS bigint OWNED BY occurrences.id;

CREATE SEQUENCE opens_id_seq AS bigint OWNED BY opens.id;

CREATE SEQUENCE plan_events_id_seq AS bigint OWNED BY plan_events.id;

-- ------------------------------------------------------------------------------------------------
-- Tables, each with its indexes
-- ------------------------------------------------------------------------------------------------

CREATE TABLE activity (
    source      text NOT NULL,
    event_id    text NOT NULL,
    user_id     text NOT NULL,
    at          timestamp with time zone NOT NULL,
    kind        text,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT activity_pkey PRIMARY KEY (source, event_id)
);
CREATE INDEX activity_last ON public.activity USING btree (user_id, at DESC);

CREATE TABLE cap_counters (
    key        text NOT NULL,
    used       integer DEFAULT 0 NOT NULL,
    last_limit integer NOT NULL,
    resets_at  timestamp with time zone NOT NULL,
    CONSTRAINT cap_counters_pkey PRIMARY KEY (key),
    CONSTRAINT cap_counters_used_check CHECK ((used >= 0))
) WITH (fillfactor=80);
CREATE INDEX cap_counters_resets ON public.cap_counters USING btree (resets_at);

CREATE TABLE catch_up (
    plan_id      text NOT NULL,
    fire_time    timestamp with time zone NOT NULL,
    requested_at timestamp with time zone DEFAULT now() NOT NULL,
    event_id     bigint,
    CONSTRAINT catch_up_pkey PRIMARY KEY (plan_id, fire_time),
    CONSTRAINT catch_up_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES plans(id)
);

CREATE TABLE consent (
    user_id     text NOT NULL,
    template_id text NOT NULL,
    credits     integer DEFAULT 0 NOT NULL,
    long_term   boolean DEFAULT false NOT NULL,
    banned      boolean DEFAULT false NOT NULL,
    updated_at  timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT consent_pkey PRIMARY KEY (user_id, template_id),
    CONSTRAINT consent_credits_check CHECK ((credits >= 0))
);

CREATE TABLE consent_events (
    id           bigint DEFAULT nextval('consent_events_id_seq'::regclass) NOT NULL,
    user_id      text NOT NULL,
    template_id  text NOT NULL,
    kind         text,
    result       text NOT NULL,
    source       text NOT NULL,
    event_id     text,
    recorded_at  timestamp with time zone DEFAULT now() NOT NULL,
    via          text DEFAULT 'popup'::text NOT NULL,
    occurred_at  timestamp with time zone DEFAULT now() NOT NULL,
    delivery_id  bigint,
    raw          jsonb,
    corroborates bigint,
    CONSTRAINT consent_events_pkey PRIMARY KEY (id),
    CONSTRAINT consent_events_corroborates_fkey FOREIGN KEY (corroborates) REFERENCES consent_events(id),
    CONSTRAINT consent_events_kind_check CHECK ((kind = ANY (ARRAY['one_time'::text, 'long_term'::text]))),
    CONSTRAINT consent_events_result CHECK ((result = ANY (ARRAY['accept'::text, 'reject'::text, 'ban'::text, 'filter'::text, 'consume'::text, 'refund'::text, 'exhausted'::text]))),
    CONSTRAINT consent_events_via_check CHECK ((via = ANY (ARRAY['popup'::text, 'settings'::text, 'send'::text])))
);
CREATE INDEX consent_events_cancellations ON public.consent_events USING btree (template_id, occurred_at) WHERE ((result = ANY (ARRAY['reject'::text, 'ban'::text, 'exhausted'::text])) AND (corroborates IS NULL));
CREATE UNIQUE INDEX consent_events_corroborated ON public.consent_events USING btree (corroborates) WHERE (corroborates IS NOT NULL);
CREATE UNIQUE INDEX consent_events_event_id ON public.consent_events USING btree (event_id) WHERE (event_id IS NOT NULL);
CREATE INDEX consent_events_history ON public.consent_events USING btree (user_id, template_id, id);
CREATE INDEX consent_events_user ON public.consent_events USING btree (user_id, template_id, recorded_at);

CREATE TABLE deliveries (
    id           bigint DEFAULT nextval('deliveries_id_seq'::regclass) NOT NULL,
    plan_id      text NOT NULL,
    plan_version integer NOT NULL,
    occurrence   text NOT NULL,
    user_id      text NOT NULL,
    step         integer NOT NULL,
    due_at       timestamp with time zone NOT NULL,
    status       text NOT NULL,
    reason       text,
    errcode      integer,
    msgid        bigint,
    detail       text,
    message      jsonb,
    claimed_by   text,
    claimed_at   timestamp with time zone DEFAULT now() NOT NULL,
    finished_at  timestamp with time zone,
    push_errcode integer,
    push_status  text,
    pushed_at    timestamp with time zone,
    defer_until  timestamp with time zone,
    variant      text,
    key_at       timestamp with time zone NOT NULL,
    opened_at    timestamp with time zone,
    CONSTRAINT deliveries_pkey PRIMARY KEY (id, key_at),
    CONSTRAINT deliveries_plan_id_occurrence_user_id_key UNIQUE (plan_id, occurrence, user_id, key_at),
    CONSTRAINT deliveries_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'sent'::text, 'failed'::text, 'skipped'::text, 'deferred'::text, 'unknown'::text, 'missed'::text])))
) PARTITION BY RANGE (key_at);
CREATE INDEX deliveries_deferred ON ONLY public.deliveries USING btree (defer_until) WHERE (status = 'deferred'::text);
CREATE INDEX deliveries_errors ON ONLY public.deliveries USING btree (plan_id, id) WHERE (status = ANY (ARRAY['failed'::text, 'unknown'::text]));
CREATE INDEX deliveries_msgid ON ONLY public.deliveries USING btree (msgid) WHERE (msgid IS NOT NULL);
CREATE INDEX deliveries_pending ON ONLY public.deliveries USING btree (claimed_by) WHERE (status = 'pending'::text);
CREATE INDEX deliveries_plan_due ON ONLY public.deliveries USING btree (plan_id, due_at);
CREATE INDEX deliveries_user_sent ON ONLY public.deliveries USING btree (user_id, due_at) WHERE (status = 'sent'::text);

CREATE TABLE delivery_counts (
    plan_id  text NOT NULL,
    due_hour timestamp with time zone NOT NULL,
    status   text NOT NULL,
    reason   text NOT NULL,
    n        bigint NOT NULL,
    CONSTRAINT delivery_counts_pkey PRIMARY KEY (plan_id, due_hour, status, reason)
);

CREATE TABLE delivery_counts_delta (
    plan_id  text NOT NULL,
    due_hour timestamp with time zone NOT NULL,
    status   text NOT NULL,
    reason   text NOT NULL,
    n        bigint NOT NULL
);

CREATE TABLE engagement_counts (
    plan_id      text NOT NULL,
    due_quarter  timestamp with time zone NOT NULL,
    plan_version integer NOT NULL,
    step         integer NOT NULL,
    variant      text NOT NULL,
    sent         bigint NOT NULL,
    delivered    bigint NOT NULL,
    opened       bigint NOT NULL,
    CONSTRAINT engagement_counts_pkey PRIMARY KEY (plan_id, due_quarter, plan_version, step, variant)
);

CREATE TABLE engagement_counts_delta (
    plan_id      text NOT NULL,
    due_quarter  timestamp with time zone NOT NULL,
    plan_version integer NOT NULL,
    step         integer NOT NULL,
    variant      text NOT NULL,
    sent         bigint NOT NULL,
    delivered    bigint NOT NULL,
    opened       bigint NOT NULL
);

CREATE TABLE enrollments (
    plan_id     text NOT NULL,
    user_id     text NOT NULL,
    start_at    timestamp with time zone NOT NULL,
    tz          text NOT NULL,
    vars        jsonb DEFAULT '{}'::jsonb NOT NULL,
    status      text DEFAULT 'active'::text NOT NULL,
    next_step   integer DEFAULT 0 NOT NULL,
    next_due_at timestamp with time zone,
    created_at  timestamp with time zone DEFAULT now() NOT NULL,
    updated_at  timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT enrollments_pkey PRIMARY KEY (plan_id, user_id),
    CONSTRAINT enrollments_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES plans(id),
    CONSTRAINT enrollments_status_check CHECK ((status = ANY (ARRAY['active'::text, 'finished'::text, 'stopped'::text])))
);
CREATE INDEX enrollments_due ON public.enrollments USING btree (plan_id, next_due_at) WHERE ((status = 'active'::text) AND (next_due_at IS NOT NULL));

CREATE TABLE occurrence_chunks (
    id            bigint DEFAULT nextval('occurrence_chunks_id_seq'::regclass) NOT NULL,
    occurrence_id bigint NOT NULL,
    after_user    text,
    last_user     text,
    cursor        text,
    state         text DEFAULT 'todo'::text NOT NULL,
    owner         text,
    takeovers     integer DEFAULT 0 NOT NULL,
    last_owner    text,
    updated_at    timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT occurrence_chunks_pkey PRIMARY KEY (id),
    CONSTRAINT occurrence_chunks_occurrence_id_fkey FOREIGN KEY (occurrence_id) REFERENCES occurrences(id) ON DELETE CASCADE,
    CONSTRAINT occurrence_chunks_state_check CHECK ((state = ANY (ARRAY['todo'::text, 'done'::text])))
);
CREATE INDEX occurrence_chunks_todo ON public.occurrence_chunks USING btree (occurrence_id, id) WHERE (state = 'todo'::text);

CREATE TABLE occurrences (
    id          bigint DEFAULT nextval('occurrences_id_seq'::regclass) NOT NULL,
    plan_id     text NOT NULL,
    occurrence  text NOT NULL,
    step        integer NOT NULL,
    fire_time   timestamp with time zone NOT NULL,
    total       integer NOT NULL,
    state       text DEFAULT 'running'::text NOT NULL,
    created_at  timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    CONSTRAINT occurrences_pkey PRIMARY KEY (id),
    CONSTRAINT occurrences_plan_id_occurrence_key UNIQUE (plan_id, occurrence),
    CONSTRAINT occurrences_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES plans(id),
    CONSTRAINT occurrences_state_check CHECK ((state = ANY (ARRAY['running'::text, 'done'::text])))
);
CREATE INDEX occurrences_running ON public.occurrences USING btree (fire_time) WHERE (state = 'running'::text);

CREATE TABLE opens (
    id          bigint DEFAULT nextval('opens_id_seq'::regclass) NOT NULL,
    user_id     text NOT NULL,
    delivery_id bigint,
    plan_id     text,
    scene       integer NOT NULL,
    opened_at   timestamp with time zone NOT NULL,
    source      text NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT opens_pkey PRIMARY KEY (id, opened_at)
) PARTITION BY RANGE (opened_at);
CREATE INDEX opens_delivery ON ONLY public.opens USING btree (delivery_id) WHERE (delivery_id IS NOT NULL);
CREATE INDEX opens_last ON ONLY public.opens USING btree (user_id, opened_at DESC);
CREATE UNIQUE INDEX opens_once ON ONLY public.opens USING btree (user_id, COALESCE(delivery_id, (0)::bigint), opened_at);
CREATE INDEX opens_plan ON ONLY public.opens USING btree (plan_id, opened_at);

CREATE TABLE opt_outs (
    user_id    text NOT NULL,
    plan_id    text NOT NULL,
    actor      text NOT NULL,
    reason     text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT opt_outs_pkey PRIMARY KEY (user_id, plan_id)
);

CREATE TABLE plan_events (
    id           bigint DEFAULT nextval('plan_events_id_seq'::regclass) NOT NULL,
    plan_id      text,
    action       text NOT NULL,
    actor        text NOT NULL,
    reason       text,
    plan_version integer,
    recorded_at  timestamp with time zone DEFAULT now() NOT NULL,
    user_id      text,
    details      jsonb,
    CONSTRAINT plan_events_pkey PRIMARY KEY (id)
);
CREATE INDEX plan_events_plan ON public.plan_events USING btree (plan_id, recorded_at);
CREATE INDEX plan_events_time ON public.plan_events USING btree (recorded_at);

CREATE TABLE plan_problems (
    source_file text NOT NULL,
    plan_id     text,
    problems    jsonb NOT NULL,
    first_seen  timestamp with time zone DEFAULT now() NOT NULL,
    last_seen   timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT plan_problems_pkey PRIMARY KEY (source_file)
);

CREATE TABLE plan_versions (
    plan_id      text NOT NULL,
    version      integer NOT NULL,
    content_hash text NOT NULL,
    source_file  text,
    definition   jsonb NOT NULL,
    loaded_at    timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT plan_versions_pkey PRIMARY KEY (plan_id, version),
    CONSTRAINT plan_versions_plan_id_content_hash_key UNIQUE (plan_id, content_hash),
    CONSTRAINT plan_versions_plan_id_fkey FOREIGN KEY (plan_id) REFERENCES plans(id)
);

CREATE TABLE plans (
    id              text NOT NULL,
    state           text DEFAULT 'active'::text NOT NULL,
    state_reason    text,
    current_version integer,
    kind            text NOT NULL,
    registered_at   timestamp with time zone DEFAULT now() NOT NULL,
    updated_at      timestamp with time zone DEFAULT now() NOT NULL,
    paused_at       timestamp with time zone,
    CONSTRAINT plans_pkey PRIMARY KEY (id),
    CONSTRAINT plans_kind_check CHECK ((kind = ANY (ARRAY['calendar'::text, 'relative'::text]))),
    CONSTRAINT plans_state_check CHECK ((state = ANY (ARRAY['active'::text, 'paused'::text, 'cancelled'::text, 'completed'::text])))
);

CREATE TABLE push_replay (
    "timestamp" bigint NOT NULL,
    nonce       text NOT NULL,
    signature   text NOT NULL,
    received_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT push_replay_pkey PRIMARY KEY ("timestamp", nonce, signature)
);
CREATE INDEX push_replay_received ON public.push_replay USING btree (received_at);

CREATE TABLE replicas (
    id         text NOT NULL,
    host       text NOT NULL,
    pid        integer NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    last_seen  timestamp with time zone DEFAULT now() NOT NULL,
    in_flight  bigint[] DEFAULT '{}'::bigint[] NOT NULL,
    CONSTRAINT replicas_pkey PRIMARY KEY (id)
);

CREATE TABLE schema_migrations (
    name       text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT schema_migrations_pkey PRIMARY KEY (name)
);

CREATE TABLE send_rate (
    app        text NOT NULL,
    tokens     double precision NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    CONSTRAINT send_rate_pkey PRIMARY KEY (app)
);

-- ------------------------------------------------------------------------------------------------
-- Views
-- ------------------------------------------------------------------------------------------------

-- (none)

-- ------------------------------------------------------------------------------------------------
-- Triggers
-- ------------------------------------------------------------------------------------------------

CREATE TRIGGER deliveries_counts_delete AFTER DELETE ON deliveries REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_deleted_v1();

CREATE TRIGGER deliveries_counts_insert AFTER INSERT ON deliveries REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_inserted_v1();

CREATE TRIGGER deliveries_counts_truncate AFTER TRUNCATE ON deliveries FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_truncated_v1();

CREATE TRIGGER deliveries_counts_update AFTER UPDATE ON deliveries REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION delivery_counts_updated_v1();

CREATE TRIGGER deliveries_engagement_delete AFTER DELETE ON deliveries REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_deleted_v1();

CREATE TRIGGER deliveries_engagement_insert AFTER INSERT ON deliveries REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_inserted_v1();

CREATE TRIGGER deliveries_engagement_truncate AFTER TRUNCATE ON deliveries FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_truncated_v1();

CREATE TRIGGER deliveries_engagement_update AFTER UPDATE ON deliveries REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION engagement_counts_updated_v1();

CREATE TRIGGER opens_mark_delivery AFTER INSERT ON opens REFERENCING NEW TABLE AS new_opens FOR EACH STATEMENT EXECUTE FUNCTION opens_mark_delivery_v1();

-- ------------------------------------------------------------------------------------------------
-- Functions
-- ------------------------------------------------------------------------------------------------

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

CREATE OR REPLACE FUNCTION public.claim_deliveries_v2(p_batch gate_batch_v2, p_rows gate_row_v2[])
 RETURNS TABLE(delivery_id bigint, user_id text, status text, reason text)
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.delivery_counts_deleted_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO delivery_counts_delta (plan_id, due_hour, status, reason, n)
    SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), -count(*)
    FROM old_rows GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.delivery_counts_inserted_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO delivery_counts_delta (plan_id, due_hour, status, reason, n)
    SELECT plan_id, date_trunc('hour', due_at, 'UTC'), status, coalesce(reason, ''), count(*)
    FROM new_rows GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.delivery_counts_truncated_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_advisory_xact_lock(72410010);  -- after a roll-up under way, not beside it
    DELETE FROM delivery_counts;
    DELETE FROM delivery_counts_delta;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.delivery_counts_updated_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.delivery_outcomes_v1(p_plan text, p_now timestamp with time zone)
 RETURNS TABLE(plan_id text, status text, reason text, d1 bigint, d7 bigint, total bigint)
 LANGUAGE sql
 STABLE
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.due_quarter_v1(p_at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT date_bin('15 minutes', p_at, timestamptz '2000-01-01 00:00+00')
$function$;

CREATE OR REPLACE FUNCTION public.engagement_counts_deleted_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO engagement_counts_delta
    SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
           -count(*), -count(*) FILTER (WHERE push_errcode = 0),
           -count(*) FILTER (WHERE opened_at IS NOT NULL)
    FROM old_rows WHERE status = 'sent' OR reason = 'push_failed'
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.engagement_counts_inserted_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO engagement_counts_delta
    SELECT plan_id, due_quarter_v1(due_at), plan_version, step, coalesce(variant, 'default'),
           count(*), count(*) FILTER (WHERE push_errcode = 0),
           count(*) FILTER (WHERE opened_at IS NOT NULL)
    FROM new_rows WHERE status = 'sent' OR reason = 'push_failed'
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.engagement_counts_truncated_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_advisory_xact_lock(72410010);  -- after a roll-up under way, not beside it
    DELETE FROM engagement_counts;
    DELETE FROM engagement_counts_delta;
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.engagement_counts_updated_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.engagement_sent_v1(p_plan text, p_edges timestamp with time zone[])
 RETURNS TABLE(due_at timestamp with time zone, plan_version integer, step integer, variant text, sent bigint, delivered bigint, opened bigint)
 LANGUAGE sql
 STABLE
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.ensure_ledger_partitions(p_months_ahead integer, p_from timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS text[]
 LANGUAGE sql
AS $function$
    SELECT ensure_month_partitions('deliveries', 'key_at', p_months_ahead, p_from)
        || ensure_month_partitions('opens', 'opened_at', p_months_ahead, p_from)
$function$;

CREATE OR REPLACE FUNCTION public.ensure_month_partitions(p_table text, p_column text, p_months_ahead integer, p_from timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS text[]
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.finish_deliveries(p_template text, p_consent_kind text, p_ids bigint[], p_statuses text[], p_reasons text[], p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until timestamp with time zone[])
 RETURNS void
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_cap_uses(p_rows gate_row_v2[], p_candidate boolean[])
 RETURNS TABLE(pos integer, key text, cap_limit integer, resets_at timestamp with time zone)
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT r.pos, c.key, c.cap_limit, c.resets_at
    FROM gate_v2_rows(p_rows) AS r, unnest(r.caps) AS c
    WHERE p_candidate[r.pos]
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_claim_rows(p_batch gate_batch_v2, p_rows gate_row_v2[])
 RETURNS bigint[]
 LANGUAGE sql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_consented(p_batch gate_batch_v2, p_rows gate_row_v2[], p_open boolean[])
 RETURNS boolean[]
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_count_caps(p_rows gate_row_v2[], p_candidate boolean[])
 RETURNS timestamp with time zone[]
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_opted_out(p_plan text, p_rows gate_row_v2[], p_ids bigint[])
 RETURNS boolean[]
 LANGUAGE sql
AS $function$
    SELECT coalesce(array_agg(p_ids[r.pos] IS NOT NULL AND EXISTS (
               SELECT 1 FROM opt_outs o
               WHERE o.user_id = r.user_id AND o.plan_id IN (p_plan, '*')) ORDER BY r.pos), '{}')
    FROM gate_v2_rows(p_rows) AS r
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_record_refusals(p_batch gate_batch_v2, p_rows gate_row_v2[], p_ids bigint[], p_out boolean[], p_consented boolean[], p_capped_until timestamp with time zone[], p_allowed boolean[])
 RETURNS TABLE(delivery_id bigint, user_id text, status text, reason text)
 LANGUAGE sql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_rows(p_rows gate_row_v2[])
 RETURNS TABLE(pos integer, occurrence text, user_id text, step integer, due_at timestamp with time zone, message jsonb, stop gate_stop_v2, caps gate_cap_v2[], variant text)
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT r.pos::int, r.occurrence, r.user_id, r.step, r.due_at, r.message, r.stop, r.caps,
           r.variant
    FROM unnest(p_rows) WITH ORDINALITY
         AS r (occurrence, user_id, step, due_at, message, stop, caps, variant, pos)
$function$;

CREATE OR REPLACE FUNCTION public.gate_v2_take_credits(p_batch gate_batch_v2, p_rows gate_row_v2[], p_ids bigint[], p_allowed boolean[])
 RETURNS void
 LANGUAGE sql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.ledger_key_at(p_occurrence text, p_due_at timestamp with time zone)
 RETURNS timestamp with time zone
 LANGUAGE sql
 STABLE
AS $function$
    SELECT CASE WHEN p_occurrence LIKE 'extra:%:since:%'
                THEN substring(p_occurrence FROM ':since:([0-9]{4}-[0-9]{2}-[0-9]{2}T[^:]*:.*)$')
                         ::timestamptz
                ELSE p_due_at END
$function$;

CREATE OR REPLACE FUNCTION public.opens_mark_delivery_v1()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    UPDATE deliveries d SET opened_at = o.first
    FROM (SELECT delivery_id, min(opened_at) AS first FROM new_opens
          WHERE delivery_id IS NOT NULL GROUP BY 1) AS o
    WHERE d.id = o.delivery_id AND (d.opened_at IS NULL OR d.opened_at > o.first);
    RETURN NULL;
END;
$function$;

CREATE OR REPLACE FUNCTION public.record_flight_v1(p_replica text, p_still_in_flight bigint[], p_candidates bigint[], p_ids bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[], p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until timestamp with time zone[])
 RETURNS bigint[]
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.record_flight_v2(p_replica text, p_still_in_flight bigint[], p_candidates bigint[], p_ids bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[], p_errcodes integer[], p_msgids bigint[], p_details text[], p_defer_until timestamp with time zone[], p_app text, p_rate double precision)
 RETURNS TABLE(authorized bigint[], waiting bigint[])
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_eligible bigint[];
    v_grant int;
    v_tokens double precision;
    v_capacity double precision := greatest(p_rate / 10, 1);
BEGIN
    -- Results first, as v1 does; its authorisations are recomputed below with the rate.
    PERFORM record_flight_v1(p_replica, p_still_in_flight, '{}', p_ids, p_templates, p_kinds,
                             p_statuses, p_reasons, p_errcodes, p_msgids, p_details,
                             p_defer_until);

    SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}') INTO v_eligible
    FROM deliveries d
    WHERE d.id = ANY (p_candidates) AND d.status = 'pending' AND d.claimed_by = p_replica;

    v_grant := cardinality(v_eligible);
    IF p_rate > 0 AND v_grant > 0 THEN
        INSERT INTO send_rate (app, tokens, updated_at)
        VALUES (p_app, v_capacity, clock_timestamp())
        ON CONFLICT (app) DO NOTHING;
        SELECT least(v_capacity, s.tokens
                     + extract(epoch FROM clock_timestamp() - s.updated_at) * p_rate)
        INTO v_tokens FROM send_rate s WHERE s.app = p_app FOR UPDATE;
        v_grant := least(v_grant, floor(v_tokens)::int);
        UPDATE send_rate SET tokens = v_tokens - v_grant, updated_at = clock_timestamp()
        WHERE app = p_app;
    END IF;

    authorized := v_eligible[1:v_grant];
    waiting := v_eligible[v_grant + 1:];
    UPDATE replicas SET in_flight = p_still_in_flight || authorized WHERE id = p_replica;
    RETURN NEXT;
END;
$function$;

CREATE OR REPLACE FUNCTION public.recover_replica_v1(p_replica text, p_dead_after interval)
 RETURNS TABLE(unknown integer, released integer, chunks integer)
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.roll_up_delivery_counts_v1()
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
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
$function$;
