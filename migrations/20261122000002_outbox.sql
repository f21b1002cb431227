-- The outbox (events waiting for the relay) and the inbox of the consumers
-- (processed_messages).

CREATE TABLE outbox (
    -- The message id: a UUIDv7, so ids sort by creation time. It travels as the
    -- AMQP message_id and is what consumers deduplicate on.
    id              UUID PRIMARY KEY,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         JSONB NOT NULL,
    headers         JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Failed publish attempts so far; past the relay's limit the event is dead.
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- The relay claims only events whose time has come (backoff after failures).
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    -- 'pending' events are relayed; 'dead' ones are parked for inspection and replay.
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead'))
);

-- The relay's claim: pending events that are due, oldest first.
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, id) WHERE state = 'pending';
-- Listing dead events.
CREATE INDEX outbox_dead_idx ON outbox (created_at) WHERE state = 'dead';

-- Wake the relay when events are committed. NOTIFY is delivered at commit (never
-- for a rolled-back transaction) and once per statement, not once per row.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Which messages each consumer has applied: inserting here in the same transaction
-- as the effect makes a redelivered message a no-op.
CREATE TABLE processed_messages (
    consumer     TEXT NOT NULL,
    message_id   UUID NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
