//! Configuration, by flag or environment variable; `--help` lists every setting.

use std::net::SocketAddr;
use std::time::Duration;

use service_kit::broker::BrokerConfig;
use service_kit::db::DbConfig;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "inventory-consumer", version, about)]
pub struct Config {
    /// Without a subcommand the consumer runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the health and metrics endpoints (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub db: DbConfig,

    #[command(flatten)]
    pub broker: BrokerConfig,

    /// Where the events come from: `rabbitmq` (the inventory queue of
    /// AMQP_URL) or `kafka` (the topic KAFKA_TOPIC_PREFIX + `order` at
    /// KAFKA_BROKERS, offsets kept in Postgres with each batch's effect).
    #[arg(long, env = "CONSUMER_TRANSPORT", value_enum, default_value_t = ConsumerTransport::Rabbitmq)]
    pub consumer_transport: ConsumerTransport,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Name recorded with each processed message id. Consumers with different
    /// names each apply every message once; instances sharing a name share the work.
    #[arg(long, env = "CONSUMER_NAME", default_value = "inventory")]
    pub consumer_name: String,

    /// Workers consuming the queue, each on its own channel with its own
    /// prefetch and batches. One is fastest when batches share their SKUs (a
    /// few best sellers, the usual case): two then queue for each other's
    /// stock row locks, each with half the batch, and cost more CPU an order
    /// (up to 45 % more in four pairs of runs: docs/benchmarks.md). Raise it when the database is far away and
    /// orders seldom share SKUs, so that one batch's round trips overlap another's.
    #[arg(long, env = "CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,

    /// Unacknowledged messages the broker may send each worker ahead of its acks
    /// (AMQP prefetch). Bounds the memory a worker holds and what a crash
    /// hands back for redelivery.
    #[arg(long, env = "PREFETCH", default_value_t = 256)]
    pub prefetch: u16,

    /// Most messages applied in one database transaction. A batch takes what has
    /// already arrived and never waits to fill up, so a lone message is applied
    /// at once.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,

    /// Turns the admin API on (`GET /admin/dlq`, `POST /admin/dlq/{id}/replay`,
    /// `POST /admin/dlq/replay`): every call must carry `Authorization: Bearer
    /// <token>`. Unset (the default), the admin routes answer 404.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// How long an OrderCancelled whose order's OrderPlaced has not been applied
    /// yet (another worker or replica holds it) is held back for it, tried
    /// again every 50 ms, before it is applied anyway (`30s`, `500ms`): the
    /// order is then cancelled with nothing to give back, and reconcile reports
    /// it as applied out of order. Only a lost OrderPlaced (dead-lettered, say)
    /// should ever take this long.
    #[arg(long, env = "OUT_OF_ORDER_WAIT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub out_of_order_wait: Duration,

    /// How long a processed message id is remembered (`7d`, `12h`, `4s`). A
    /// redelivery older than this counts as new; for OrderPlaced that is harmless,
    /// as its order is no longer PENDING. Keep it well above the longest time a
    /// message can spend in the queue or the dead-letter queue before a replay.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "7d",
          value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// How often processed message ids past the dedup window are swept (one
    /// replica at a time does it).
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1m",
          value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
}

/// The broker the consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerTransport {
    Rabbitmq,
    Kafka,
}

/// The Kafka settings (with `CONSUMER_TRANSPORT=kafka`); the first two mean
/// what they mean for order-service, with the same defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` separated by commas.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// Prefix of the topic names, its separator included: the events of orders
    /// are in `<prefix>order`, the dead letters in `<prefix>order.dlq`.
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "outbox.")]
    pub kafka_topic_prefix: String,

    /// KAFKA_PARTITIONS of the events topic (the dead-letter topic gets one)
    /// and KAFKA_REPLICATION_FACTOR, for the topics it creates.
    #[command(flatten)]
    pub topics: service_kit::kafka::TopicSettings,

    /// The longest a fetch waits when its partition has no new record (`50ms`,
    /// `500ms`). Kafka answers as soon as a record arrives, so there a longer
    /// wait only saves idle fetches (each idle partition costs one a wait);
    /// some Kafka-protocol brokers (tansu) hold every fetch for the whole wait,
    /// which then adds up to it to the lag.
    #[arg(long, env = "KAFKA_FETCH_WAIT", default_value = "50ms",
          value_parser = humantime::parse_duration)]
    pub kafka_fetch_wait: std::time::Duration,
}

impl KafkaConfig {
    /// The topic of the order events.
    pub fn topic(&self) -> String {
        format!("{}order", self.kafka_topic_prefix)
    }

    /// Its dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic())
    }

    pub fn brokers(&self) -> Vec<String> {
        self.kafka_brokers
            .split(',')
            .map(str::trim)
            .filter(|broker| !broker.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Inspect and replay the dead-letter queue (needs the broker, not the database).
    ///
    /// Only AMQP_URL, INVENTORY_QUEUE and DEAD_LETTER_QUEUE matter here (with
    /// CONSUMER_TRANSPORT=kafka: KAFKA_BROKERS and KAFKA_TOPIC_PREFIX, the
    /// dead letters being in the topic `<prefix>order.dlq`), given as
    /// environment variables or as flags before or after the subcommand.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List the dead-letter queue's messages, oldest first, without removing them.
    ///
    /// One line per message: its message id, how many times it was dead-lettered
    /// (counting rounds before earlier replays), when first, and why: the
    /// consumer's reason (the `x-dead-letter-reason` header), else the broker's
    /// (`delivery_limit` when a quorum queue's delivery limit was reached,
    /// `rejected`, ...). Each message is held unacked while the list is made,
    /// then all are handed back in one go: one pass, nothing removed. On Kafka
    /// the dead-letter topic is read from its start, less the letters replayed.
    List {
        /// Most messages to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move messages from the dead-letter queue back to the inventory queue.
    ///
    /// Each goes straight to the inventory queue (through the default exchange,
    /// so other queues bound to the events exchange do not get it again) with
    /// publisher confirms, and leaves the dead-letter queue only once the broker
    /// confirmed its copy: a message may end up in both queues, never in neither,
    /// and the consumer ignores a message it already applied. The reason and the
    /// broker's x-death are dropped (they describe the death being undone); the
    /// death count and first death time stay. Prints how many were replayed.
    /// Exits 1 if no message has the `--id`, or if the broker did not confirm one
    /// (it stays in the dead-letter queue). On Kafka each goes back to the
    /// partition it died on, and a marker in the dead-letter topic, written once
    /// the broker took the event, keeps it out of later lists.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Replay {
        /// Replay the message with this message id (every copy, if it is there twice).
        #[arg(long)]
        id: Option<String>,
        /// Replay every message in the dead-letter queue.
        #[arg(long)]
        all: bool,
    },
}

impl Config {
    /// How long processed message ids are kept: `DEDUP_WINDOW`, which is also
    /// the window `order-service reconcile` checks (its `--dedup-window`, same
    /// default), so every id it looks for is still here.
    pub fn inbox_retention(&self) -> outbox::retention::Retention {
        outbox::retention::Retention::processed_messages(self.dedup_window)
    }

    /// The command line, taking the settings the dead-letter tools use after a
    /// subcommand as well (`inventory-consumer dlq list --amqp-url ...`).
    pub fn command_line() -> clap::Command {
        use clap::CommandFactory;
        const DLQ_SETTINGS: [&str; 6] = [
            "amqp_url",
            "inventory_queue",
            "dead_letter_queue",
            "consumer_transport",
            "kafka_brokers",
            "kafka_topic_prefix",
        ];
        Self::command().mut_args(|arg| {
            let global = DLQ_SETTINGS.contains(&arg.get_id().as_str());
            arg.global(global)
        })
    }

    /// Parses `args` (the program name first) as [`Config::command_line`]
    /// describes; on an error or `--help`, prints and exits as clap does.
    pub fn parse_command_line<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_command_line(args).unwrap_or_else(|error| error.exit())
    }

    /// Like [`Config::parse_command_line`], returning the error.
    pub fn try_parse_command_line<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::FromArgMatches;
        let mut matches = Self::command_line().try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches)
    }
}
