-- A sends-per-second limit per WeChat app, shared by every replica (REMINDERS_SEND_RATE): a
-- token bucket per app, taken from in the flight recorder's round trip, so a send is authorized
-- to go on the wire only with a token. Its capacity is a tenth of a second's worth (at least
-- one), so no second ever carries much more than the rate, whatever the number of replicas.
CREATE TABLE send_rate (
    app        text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz NOT NULL
);

-- record_flight_v1, plus the rate: of the candidates still pending and ours, as many as the
-- bucket holds are authorized (lowest ids first); the others stay claimed and ours and are
-- returned as `waiting`, for the next round trip. p_rate 0: no limit (the bucket is not touched).
CREATE FUNCTION record_flight_v2(
    p_replica text, p_still_in_flight bigint[], p_candidates bigint[],
    p_ids bigint[], p_templates text[], p_kinds text[], p_statuses text[], p_reasons text[],
    p_errcodes int[], p_msgids bigint[], p_details text[], p_defer_until timestamptz[],
    p_app text, p_rate double precision
) RETURNS TABLE (authorized bigint[], waiting bigint[])
LANGUAGE plpgsql AS $$
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
$$;
