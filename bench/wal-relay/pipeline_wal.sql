-- pipeline_batch.sql (../shared/perf/, the pipeline ceiling) as it would be with a relay that
-- reads the WAL: the write transaction emits each event with pg_logical_emit_message (a
-- transactional logical message, no outbox row) and there is no relay transaction: the events
-- reach the relay through a logical replication slot (scripts/bench-wal-relay.sh streams it with
-- pg_recvlogical). The write's other statements and the consumer transaction are the same.
-- Run with pgbench -M prepared -D batch=64 on a database made by pipeline-migrations/.
\set base random(1, 1000000000)
SELECT array_agg(encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
         PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
         FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid ORDER BY g) AS oids,
       array_agg(encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
         PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
         FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid ORDER BY g) AS eids
FROM generate_series(1, :batch) g \gset
BEGIN;
SELECT now(), array_agg(sku), array_agg(price_cents) FROM inventory
    WHERE sku = ANY(ARRAY['SKU-001','SKU-002','SKU-003','SKU-004','SKU-005','SKU-006','SKU-007','SKU-008','SKU-009','SKU-010','SKU-011','SKU-012','SKU-013','SKU-014','SKU-015','SKU-016','SKU-017','SKU-018','SKU-019','SKU-020']);
INSERT INTO idempotency_keys (idempotency_key, request, order_id, response_status, response_body)
    SELECT 'key-' || :base || '-' || n, jsonb_build_object('customer_id', 'stress-' || n % 1000,
           'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-001', 'quantity', 2), jsonb_build_object('sku', 'SKU-007', 'quantity', 1))),
           o, 201, jsonb_build_object('id', o, 'customer_id', 'stress-' || n % 1000, 'status', 'PENDING', 'total_cents', 2345,
           'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-001', 'quantity', 2, 'unit_price_cents', 479),
                                      jsonb_build_object('sku', 'SKU-007', 'quantity', 1, 'unit_price_cents', 2753)),
           'created_at', now(), 'updated_at', now())
    FROM unnest(:oids::uuid[]) WITH ORDINALITY AS t(o, n)
    ORDER BY 1 ON CONFLICT (idempotency_key) DO NOTHING RETURNING order_id;
INSERT INTO orders (id, customer_id, total_cents)
    SELECT o, 'stress-' || n % 1000, 2345 FROM unnest(:oids::uuid[]) WITH ORDINALITY AS t(o, n);
INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
    SELECT o, 'SKU-' || lpad((1 + (n + k * 7) % 20)::text, 3, '0'), 1 + k, 479
    FROM unnest(:oids::uuid[]) WITH ORDINALITY AS t(o, n), generate_series(0, 1) AS k;
SELECT count(pg_logical_emit_message(true, 'outbox', jsonb_build_object(
           'id', e, 'aggregate_type', 'order', 'aggregate_id', o::text, 'event_type', 'OrderPlaced',
           'payload', jsonb_build_object('order_id', o, 'customer_id', 'stress-' || n % 1000,
             'lines', jsonb_build_array(jsonb_build_object('sku', 'SKU-001', 'quantity', 2), jsonb_build_object('sku', 'SKU-007', 'quantity', 1)),
             'total_cents', 2345),
           'headers', jsonb_build_object('event_version', '1.0', 'traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'))::text))
    FROM unnest(:oids::uuid[], :eids::uuid[]) WITH ORDINALITY AS t(o, e, n);
COMMIT;
BEGIN;
SELECT id, status FROM orders WHERE id = ANY(:oids::uuid[]) ORDER BY id FOR NO KEY UPDATE;
INSERT INTO processed_messages (consumer, message_id)
    SELECT 'inventory', id FROM unnest(:eids::uuid[]) AS t(id) ON CONFLICT DO NOTHING RETURNING message_id;
SELECT sku, available::int8 FROM inventory WHERE sku = ANY(ARRAY['SKU-001','SKU-002','SKU-003','SKU-004','SKU-005','SKU-006','SKU-007','SKU-008','SKU-009','SKU-010','SKU-011','SKU-012','SKU-013','SKU-014','SKU-015','SKU-016','SKU-017','SKU-018','SKU-019','SKU-020'])
    ORDER BY sku FOR NO KEY UPDATE;
UPDATE inventory SET available = available - r.quantity
    FROM (SELECT 'SKU-' || lpad(n::text, 3, '0') AS sku, 3 AS quantity FROM generate_series(1, 20) n) AS r
    WHERE inventory.sku = r.sku;
UPDATE orders SET status = 'COMPLETED', decided_by = d.message_id, updated_at = now()
    FROM unnest(:oids::uuid[], :eids::uuid[]) AS d(id, message_id) WHERE orders.id = d.id;
COMMIT;
