-- Engagement figures (issue 13; docs/engagement.md): what each delivery led to, read by
-- scheduler/store/engagement.py.

-- deliveries.variant (the content variant a delivery carried) is added by 008 with the claim
-- that writes it.

-- A cancellation is attributed to the user's last delivery of the template before it: looked up
-- per (user, due time) among the sends WeChat accepted.
CREATE INDEX deliveries_user_sent ON deliveries (user_id, due_at) WHERE status = 'sent';

-- Opens by the delivery they came from (the `rmd` id).
CREATE INDEX opens_delivery ON opens (delivery_id) WHERE delivery_id IS NOT NULL;

-- The consent changes that may be cancellations, by template.
CREATE INDEX consent_events_cancellations ON consent_events (template_id, occurred_at)
    WHERE result IN ('reject', 'ban', 'exhausted') AND corroborates IS NULL;
