-- An event's `created_at` is the database's clock when it is inserted, not its
-- transaction's start. The relay publishes one aggregate's events in
-- (`created_at`, id) order, and writers of one aggregate serialise on a lock of
-- its row: the second inserts only after the first committed. With the
-- transaction's start, a transaction that began before the first and then
-- waited for the lock would stamp its event earlier, and it would be published
-- first. (`next_attempt_at`, which the claim floor reads, stays the
-- transaction's start.) Only the default changes: nothing is rewritten.
ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT clock_timestamp();
