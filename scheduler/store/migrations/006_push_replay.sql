-- WeChat's push `signature` covers the Token, timestamp and nonce, not the body: anyone who saw
-- one callback URL could post any body with it while its timestamp is fresh. So each signed
-- (timestamp, nonce, signature) is accepted once, by whichever replica sees it first; rows
-- older than the freshness window can never match a fresh request again and are pruned.
CREATE TABLE push_replay (
    timestamp   bigint NOT NULL,
    nonce       text NOT NULL,
    signature   text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (timestamp, nonce, signature)
);
CREATE INDEX push_replay_received ON push_replay (received_at);
