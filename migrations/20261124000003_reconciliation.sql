-- What `order-service reconcile` needs to prove that nothing was lost: which
-- message decided each order, and how much stock each SKU received.
--
-- Tables are altered in the order the services lock them (orders, then
-- inventory), so this migration waits for running writers and consumers
-- instead of deadlocking with them. Each ALTER holds its table's ACCESS
-- EXCLUSIVE lock until the migration commits, so the backfill below reads a
-- state no consumer can change under it.

-- The id of the message whose effect decided the order (COMPLETED or
-- REJECTED), written by the consumer in the same statement and transaction as
-- the status, so a decided order names the row of `processed_messages` that
-- recorded it. NULL while PENDING, and for orders decided before this column
-- existed. Nullable without a default: adding it rewrites nothing. No index:
-- every index on a column the consumer's UPDATE changes would deny that update
-- the HOT path (see 20261124000002_lean_order_writes.sql).
ALTER TABLE orders ADD COLUMN decided_by UUID;

-- When a schema change took effect, for checks that must tell rows written
-- before it from rows written after. One row per change.
CREATE TABLE schema_epochs (
    name TEXT PRIMARY KEY,
    at   TIMESTAMPTZ NOT NULL
);

-- From this instant every decision names its message: an order decided with
-- `updated_at` before it may have a NULL `decided_by` (decided by an older
-- consumer), one decided after may not. The clock is read after the ALTER
-- above has its lock: every transaction that decided an order without the
-- column had committed by then, and its `updated_at` (its own start time) is
-- earlier. (`now()`, like `_sqlx_migrations.installed_on`, is the start of this
-- transaction, which may precede a decision still committing while the ALTER
-- waited for its lock.)
INSERT INTO schema_epochs (name, at) VALUES ('orders.decided_by', clock_timestamp());

-- Stock each SKU has received in all: what it started with plus any restock.
-- The consumer takes from `available` only, so at all times
--     available = received - Σ quantity of the lines of COMPLETED orders,
-- which `order-service reconcile` checks. Code that adds a SKU sets both;
-- a restock adds to both.
--
-- A derived value has no DEFAULT: add the column, fill it so that existing
-- data satisfies the equation, then make it NOT NULL.
ALTER TABLE inventory ADD COLUMN received INTEGER;

UPDATE inventory SET received = available;
UPDATE inventory AS i
SET received = i.available + taken.quantity
FROM (
    SELECT l.sku, sum(l.quantity) AS quantity
    FROM order_lines AS l
    JOIN orders AS o ON o.id = l.order_id
    WHERE o.status = 'COMPLETED'
    GROUP BY l.sku
) AS taken
WHERE taken.sku = i.sku;

ALTER TABLE inventory ALTER COLUMN received SET NOT NULL;
