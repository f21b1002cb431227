-- The order lines' foreign key to the catalogue, replaced by the write's own
-- check. It was the write's largest cost (docs/benchmarks.md, "Where the
-- database's time goes"): one query per line, each taking a `FOR KEY SHARE`
-- lock on one of the catalogue's few, hot rows while the consumer updates
-- the same rows, which turns those locks into MultiXacts.
--
-- What it guaranteed still holds: every line's SKU is in the catalogue.
-- order-service prices each line from `inventory` in the transaction that
-- writes it and refuses an unknown SKU, and a catalogue row, once committed,
-- is never deleted nor renamed (the triggers below refuse both, and
-- TRUNCATE), so the SKU the write read is still there when it commits. A SKU
-- leaves the catalogue by having no stock, not by deletion. `order-service
-- reconcile` checks it from outside (check "order lines").
--
-- Locks: `inventory` first, then `order_lines`, the order in which
-- order-service's write takes them, so this waits for running writes instead
-- of deadlocking with them (the consumer never locks `order_lines`).
LOCK TABLE inventory IN ACCESS EXCLUSIVE MODE;
LOCK TABLE order_lines IN ACCESS EXCLUSIVE MODE;

ALTER TABLE order_lines DROP CONSTRAINT IF EXISTS order_lines_sku_fkey;

CREATE FUNCTION inventory_rows_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'inventory rows are never %: order lines name them by sku (a SKU leaves the catalogue with available = 0)',
        CASE TG_OP WHEN 'UPDATE' THEN 'renamed' WHEN 'DELETE' THEN 'deleted' ELSE 'truncated' END
        USING ERRCODE = 'restrict_violation', TABLE = 'inventory';
END
$$;

CREATE TRIGGER inventory_rows_stay
    BEFORE DELETE ON inventory
    FOR EACH ROW EXECUTE FUNCTION inventory_rows_stay();

-- Only a real rename: an UPDATE that sets sku to itself (an ORM writing every
-- column, an upsert) is let through.
CREATE TRIGGER inventory_skus_stay
    BEFORE UPDATE OF sku ON inventory
    FOR EACH ROW WHEN (OLD.sku IS DISTINCT FROM NEW.sku)
    EXECUTE FUNCTION inventory_rows_stay();

CREATE TRIGGER inventory_not_truncated
    BEFORE TRUNCATE ON inventory
    FOR EACH STATEMENT EXECUTE FUNCTION inventory_rows_stay();
