-- Ingestion: consent history with provenance and dedupe, WeChat's final delivery results,
-- and opens of the mini program from a notification.

-- consent_events is the append-only history; `consent` is a cache derived from it (by
-- scheduler.domain.consent), updated in the same transaction as each append.
--   source       who reported it: 'api:<token name>', 'wechat:callback', 'wechat:43101',
--                'dispatcher', 'cli', ...
--   via          where the user acted: the popup, the settings page, or the send pipeline
--   kind         NULL when unknown (a push for a template no plan declares): both kinds' effects
--   occurred_at  when it happened, as the reporter says (WeChat's CreateTime, the API's `at`)
--   event_id     the reporter's id for it (WeChat pushes: a stable id built from the event), so
--                a retried report is applied once
--   corroborates the earlier event reporting the same popup choice (the backend's report and
--                WeChat's push of one tap): kept, but it grants nothing more
ALTER TABLE consent_events ALTER COLUMN kind DROP NOT NULL;
ALTER TABLE consent_events
    ADD COLUMN via text NOT NULL DEFAULT 'popup' CHECK (via IN ('popup', 'settings', 'send')),
    ADD COLUMN occurred_at timestamptz,
    ADD COLUMN delivery_id bigint,
    ADD COLUMN raw jsonb,
    ADD COLUMN corroborates bigint REFERENCES consent_events (id),
    ADD CONSTRAINT consent_events_result CHECK (result IN
        ('accept', 'reject', 'ban', 'filter', 'consume', 'refund', 'exhausted'));
UPDATE consent_events SET occurred_at = recorded_at WHERE occurred_at IS NULL;
ALTER TABLE consent_events ALTER COLUMN occurred_at SET DEFAULT now();
ALTER TABLE consent_events ALTER COLUMN occurred_at SET NOT NULL;
CREATE UNIQUE INDEX consent_events_event_id ON consent_events (event_id)
    WHERE event_id IS NOT NULL;
CREATE INDEX consent_events_history ON consent_events (user_id, template_id, id);
CREATE UNIQUE INDEX consent_events_corroborated ON consent_events (corroborates)
    WHERE corroborates IS NOT NULL;

-- WeChat's subscribe_msg_sent_event: the final result of a send, matched by its msgid.
ALTER TABLE deliveries
    ADD COLUMN push_errcode int,
    ADD COLUMN push_status text,
    ADD COLUMN pushed_at timestamptz;
CREATE INDEX deliveries_msgid ON deliveries (msgid) WHERE msgid IS NOT NULL;

-- A user opened the mini program from a notification (scene 1014/1107). `delivery_id` comes
-- from the tracking parameter the dispatcher adds to each message's page.
CREATE TABLE opens (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    delivery_id bigint REFERENCES deliveries (id),
    plan_id     text,
    scene       int NOT NULL,
    opened_at   timestamptz NOT NULL,
    source      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX opens_once ON opens (user_id, coalesce(delivery_id, 0), opened_at);
CREATE INDEX opens_plan ON opens (plan_id, opened_at);

-- Record the channel's results for a batch, and what they say about consent, appended to the
-- consent history under the lock of the consent row (so the history's order is the cache's):
-- 43101 means the user has none left ('exhausted', source 'wechat:43101'); any other failure of
-- a one-time send gives its credit back, since WeChat did not use it ('refund'), and so does a
-- send put back for later ('deferred' until p_defer_until: WeChat's daily quota was spent, or
-- 'skipped' when that is too late), whose next claim takes a credit again.
CREATE FUNCTION finish_deliveries(
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
            finished_at = CASE WHEN r.status = 'deferred' THEN NULL ELSE now() END
        FROM unnest(p_ids, p_statuses, p_reasons, p_errcodes, p_msgids, p_details, p_defer_until)
             AS r (id, status, reason, errcode, msgid, detail, until)
        WHERE d.id = r.id AND d.status = 'pending'
        RETURNING d.id, d.user_id, r.status, r.errcode
    )
    SELECT
        coalesce(array_agg(id) FILTER (WHERE errcode = 43101), '{}'),
        coalesce(array_agg(user_id) FILTER (WHERE errcode = 43101), '{}'),
        coalesce(array_agg(id) FILTER (WHERE status <> 'sent'
            AND errcode IS DISTINCT FROM 43101 AND p_consent_kind = 'one_time'), '{}'),
        coalesce(array_agg(user_id) FILTER (WHERE status <> 'sent'
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
