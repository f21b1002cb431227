//! The settings of the Kafka topics a service creates when they are missing,
//! the same in order-service and inventory-consumer, so that whichever starts
//! first makes the same topic.

/// How a service creates a missing topic.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicSettings {
    /// Kafka: partitions of the events topic when this service creates it (at
    /// start, when it is missing). More partitions let more consumer replicas
    /// share the work; one order's events are in one partition.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 8,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,

    /// Kafka: replication factor of the topics this service creates.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1,
          value_parser = clap::value_parser!(i16).range(1..=32))]
    pub kafka_replication_factor: i16,
}
