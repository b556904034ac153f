-- Subscriptions (FHIR R4 Subscriptions Backport IG 1.1.0) and their durable outbox (SPEC.md §4).
-- The Subscription resource itself is stored like any other; this row is its delivery state.
-- events_count is the last event number handed out (bumped in the transaction that caused the
-- event, so numbers follow commit order per subscription); delivered_count is the highest number the
-- endpoint acknowledged (delivery is in order, so every event up to it arrived).
CREATE TABLE subscriptions (
    id              TEXT PRIMARY KEY,
    topic           TEXT NOT NULL,
    owner           TEXT NOT NULL,
    status          TEXT NOT NULL,
    events_count    BIGINT NOT NULL DEFAULT 0,
    delivered_count BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_sent_at    BIGINT NOT NULL DEFAULT 0,
    heartbeat_secs  BIGINT,
    end_at          BIGINT,
    lease_owner     TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX subscriptions_by_topic ON subscriptions (topic, status);
CREATE INDEX subscriptions_due ON subscriptions (next_attempt_at) WHERE status IN ('requested', 'active');

-- The outbox: one row per event per subscription, written with the change that caused it. Rows stay
-- after delivery so that $events can replay them.
CREATE TABLE subscription_events (
    subscription_id TEXT NOT NULL,
    event_number    BIGINT NOT NULL,
    focus           TEXT NOT NULL,
    occurred_at     BIGINT NOT NULL,
    PRIMARY KEY (subscription_id, event_number)
);
