-- The outbox without a hot row. An event is appended here by the transaction that causes it, in
-- a global sequence and without touching its subscription's row (numbering it there locked the row
-- until COMMIT and serialised every case-making writer). The delivery lease holder moves a
-- subscription's rows, in sequence order, into subscription_events with consecutive numbers.
CREATE TABLE subscription_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL,
    focus           TEXT NOT NULL,
    occurred_at     BIGINT NOT NULL
);
CREATE INDEX subscription_outbox_by_subscription ON subscription_outbox (subscription_id, seq);

-- Delivered events older than the retention period are deleted; every number up to this one is gone.
ALTER TABLE subscriptions ADD COLUMN pruned_count BIGINT NOT NULL DEFAULT 0;
