-- Per-aggregate order: the relay claims only the head of each aggregate (its
-- earliest pending event), so that one aggregate's events are published in the
-- order they were written (see `store::CLAIM_DUE_SQL`). This index answers
-- "is there an earlier pending event of this aggregate?" with one probe.
CREATE INDEX IF NOT EXISTS outbox_aggregate_idx
    ON outbox (aggregate_type, aggregate_id, created_at, id) WHERE state = 'pending';
