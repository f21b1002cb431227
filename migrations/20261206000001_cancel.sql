-- Cancelling an order (POST /orders/{id}/cancel).
--
-- The request is recorded once per order, in the transaction that writes its
-- OrderCancelled event; a second request finds the row and writes nothing.
-- The consumer, applying the event, gives back the stock the order took and
-- sets CANCELLED in one transaction, so a CANCELLED order never holds stock.
CREATE TABLE order_cancellations (
    order_id     UUID PRIMARY KEY REFERENCES orders (id) ON DELETE CASCADE,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- CANCELLED joins the statuses. NOT VALID, then VALIDATE: the check of the
-- existing rows takes a lock that lets writers and the consumer go on.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('PENDING', 'COMPLETED', 'REJECTED', 'CANCELLED')) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_status_check;
