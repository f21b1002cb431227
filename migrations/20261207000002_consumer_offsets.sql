-- inventory-consumer on Kafka (CONSUMER_TRANSPORT=kafka): the next offset of
-- each partition it applies, written in the transaction of the effect, so an
-- effect and its offset commit together; and the replicas that share a
-- consumer name, so that each takes its share of the partitions.
CREATE TABLE consumer_offsets (
    consumer    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- A replica's heartbeat; one unseen for a while has left.
CREATE TABLE consumer_members (
    consumer  TEXT NOT NULL,
    member    UUID NOT NULL,
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, member)
);
