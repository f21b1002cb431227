-- Tables that grow with traffic stay bounded, and stay cheap to read while they churn.

-- Retention. The sweepers delete rows past their window oldest first, in bounded
-- batches; these indexes make each batch a short index range scan instead of a
-- scan of the whole table.
CREATE INDEX processed_messages_processed_at_idx ON processed_messages (processed_at);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

-- Autovacuum per table. The defaults wait for 20 % of a table to be dead before
-- vacuuming and for 10 % to change before analysing, which suits tables that
-- mostly grow, not these:
--
-- outbox: a queue. Every event is inserted and deleted within milliseconds, so
--   the table is all churn and almost no live rows: vacuum it after a fixed number
--   of dead rows and never throttle it (it is small once vacuumed), so the relay's
--   index scans do not wade through dead entries.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);

-- processed_messages, idempotency_keys: a sliding window. Once full, the sweeper
-- deletes as many rows as are inserted; at 20 % the dead rows of a window of tens
-- of millions would be millions before vacuum came. Vacuum at 2 %, and analyse at
-- 2 % so plans follow the window's size.
ALTER TABLE processed_messages SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE idempotency_keys SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- orders: grows for ever and every order is updated once (PENDING to a decision,
-- which also touches the status index). Analyse often enough that plans know its
-- size, and vacuum the dead versions those updates leave before they add up.
ALTER TABLE orders SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
