-- The yardstick of issue "group commit": the schema that the single-order write
-- transaction (bench/e2e/order.pgbench, order-service's `orders::place`) touches,
-- as of commit 2533de6, copied from migrations/20261122000001_orders.sql,
-- 20261122000002_outbox.sql and 20261124000001_retention_and_vacuum.sql.
--
-- FROZEN ON PURPOSE: never update this file when the schema changes. It measures
-- what Postgres on this machine can commit of TODAY's one-order transaction (the
-- "ceiling" of scripts/bench-e2e.sh), so that later versions of the system can be
-- compared against the same ceiling. A new schema gets a new yardstick, not an
-- edit of this one.
--
-- Left out: processed_messages (the consumer's inbox, not written by an order)
-- and the migration bookkeeping (_sqlx_migrations).

-- ---- 20261122000001_orders.sql ------------------------------------------------

CREATE TABLE inventory (
    sku         TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    available   INTEGER NOT NULL CHECK (available >= 0),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0)
);

-- SKU-001 .. SKU-020 have ample stock, SKU-021 .. SKU-025 very little.
INSERT INTO inventory (sku, name, available, price_cents)
SELECT format('SKU-%s', lpad(n::text, 3, '0')),
       format('Catalogue item %s', n),
       CASE WHEN n <= 20 THEN 1000000 ELSE 25 END,
       100 + (n * 379) % 9900
FROM generate_series(1, 25) AS n;

CREATE TABLE orders (
    id          UUID PRIMARY KEY,
    customer_id TEXT NOT NULL,
    total_cents BIGINT NOT NULL CHECK (total_cents >= 0),
    status      TEXT NOT NULL DEFAULT 'PENDING'
                CHECK (status IN ('PENDING', 'COMPLETED', 'REJECTED')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX orders_status_idx ON orders (status);

CREATE TABLE order_lines (
    order_id         UUID NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    sku              TEXT NOT NULL REFERENCES inventory (sku),
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, sku)
);

-- Not written by an order placed without an Idempotency-Key (the stress test
-- sends none by default), but part of the schema the write runs against.
CREATE TABLE idempotency_keys (
    idempotency_key TEXT PRIMARY KEY,
    request         JSONB NOT NULL,
    order_id        UUID NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    response_status SMALLINT NOT NULL,
    response_body   JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ---- 20261122000002_outbox.sql ------------------------------------------------

CREATE TABLE outbox (
    id              UUID PRIMARY KEY,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         JSONB NOT NULL,
    headers         JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead'))
);

CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX outbox_dead_idx ON outbox (created_at) WHERE state = 'dead';

-- NOTIFY at commit, once per statement: part of the cost of every order.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- ---- 20261124000001_retention_and_vacuum.sql (the tables above) ----------------

CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE idempotency_keys SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE orders SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
