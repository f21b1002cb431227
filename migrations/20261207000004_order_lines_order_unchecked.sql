-- The order lines' foreign key to their order, replaced by the write's own
-- order of statements. Its check was one query per line and a row lock on the
-- order just inserted (docs/benchmarks.md, "Where the database's time goes").
--
-- What it guaranteed still holds: every line's order exists. Lines are
-- written by order-service alone, in the statement after their orders', in the
-- same transaction, and deleting an order still deletes its lines, by the
-- triggers below instead of ON DELETE CASCADE (a DELETE, and a TRUNCATE of
-- orders, which the other foreign keys let through only with CASCADE). `order-service reconcile` checks
-- it from outside (check "order lines").
--
-- Locks: `orders` first, then `order_lines`, the order in which both the
-- write and a delete of orders take them, so this waits for them instead of
-- deadlocking (the consumer never locks `order_lines`).
LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;
LOCK TABLE order_lines IN ACCESS EXCLUSIVE MODE;

ALTER TABLE order_lines DROP CONSTRAINT IF EXISTS order_lines_order_id_fkey;

-- One statement per DELETE on orders, whatever the number of rows.
CREATE FUNCTION order_lines_go_with_their_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM order_lines AS l USING gone WHERE l.order_id = gone.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER order_lines_go_with_their_order
    AFTER DELETE ON orders
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION order_lines_go_with_their_order();

CREATE FUNCTION order_lines_truncated_with_orders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE order_lines;
    RETURN NULL;
END
$$;

CREATE TRIGGER order_lines_truncated_with_orders
    AFTER TRUNCATE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION order_lines_truncated_with_orders();
