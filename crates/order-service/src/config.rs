//! Configuration, by flag or environment variable; `--help` lists every setting.

use std::net::SocketAddr;
use std::time::Duration;

use outbox::kafka::KafkaTransport;
use outbox::rabbitmq::RabbitMq;
use outbox::relay::{RelayConfig, Unroutable};
use service_kit::broker::BrokerConfig;
use service_kit::db::DbConfig;
use uuid::Uuid;

use crate::writer::{WriteOptions, WriterConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-service", version, about)]
pub struct Config {
    /// Without a subcommand the service runs (API and relay).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080", global = true)]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub db: DbConfig,

    #[command(flatten)]
    pub broker: BrokerConfig,

    #[command(flatten)]
    pub relay: RelayArgs,

    #[command(flatten)]
    pub write: WriteArgs,

    /// Turns the admin API on (`/admin/*`: the outbox's dead events and their
    /// replay): every admin call must carry `Authorization: Bearer <token>`.
    /// Unset (the default), the admin routes answer 404. Use a long random
    /// value (`openssl rand -hex 32`).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// inventory-consumer's HTTP address (`http://inventory-consumer:9090`):
    /// the console then shows its dead-letter queue and replays from it,
    /// calling its admin API with this service's ADMIN_TOKEN (the consumer's
    /// must be the same). Unset (the default), the console has no DLQ panel.
    #[arg(long, env = "CONSUMER_ADMIN_URL", value_parser = parse_http_url)]
    pub consumer_admin_url: Option<reqwest::Url>,

    /// Largest request body accepted, in bytes (larger bodies get 413).
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// How long one request may take before it is answered 408 (and nothing
    /// written). A POST /orders whose order is already being written is
    /// answered by its transaction's outcome instead (see COMMIT_DEADLINE).
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// How long an Idempotency-Key is remembered (`24h`, `30m`, `4s`). A retry
    /// with the same key after that creates a new order.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub idempotency_key_ttl: Duration,

    /// How often expired Idempotency-Keys are swept (one replica at a time does it).
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1m",
          value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Inspect and replay events in the outbox.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Check that nothing was lost: prints a report, one line per check, and
    /// exits 0 when every check holds, 1 when one fails, 2 when it cannot run.
    ///
    /// Reads the database of DATABASE_URL (or `order-service --database-url URL
    /// reconcile`) in one read-only snapshot: exact while the system runs. It
    /// needs no broker, neither creates nor migrates the database, and holds
    /// no lock that writers wait for. Each check is one pass over its tables
    /// (sequential scans: about two seconds on a million orders).
    ///
    /// 1. pending orders: no order has been PENDING for longer than
    ///    --pending-after (the event never reached the consumer, or its
    ///    effect was lost). Lists the oldest with their age.
    ///
    /// 2. decided orders: each COMPLETED or REJECTED order names the message
    ///    that decided it (orders.decided_by, written by the consumer with the
    ///    status). Orders decided before that column existed (an upgraded
    ///    database) are counted apart and not checked.
    ///
    /// 3. processed messages: the message of each order decided within
    ///    --dedup-window is in processed_messages under --consumer, as the
    ///    consumer recorded it in the same transaction (older ids have been
    ///    swept).
    ///
    /// 4. stock: for each SKU, available = received - the quantities of the
    ///    lines of its COMPLETED orders; names every SKU that is off, and by
    ///    how much.
    ///
    /// 5. order lines: each names an order that exists and a SKU of the
    ///    catalogue (the write checks both; no foreign key does).
    ///
    /// 6. outbox: no dead event; pending events are counted, and one pending
    ///    for longer than --pending-after fails (the relay is stuck or down).
    ///
    /// 7. idempotency keys: each names an order that exists, and the answer
    ///    stored for its retries is a 201 with that order's id, customer and
    ///    total.
    ///
    /// 8. cancels: every order whose cancel was accepted longer than
    ///    --pending-after ago is CANCELLED (the consumer applied it).
    ///
    /// 9. event order: no cancel was applied before its order's OrderPlaced
    ///    (orders.cancelled_from, the status each cancel found, is never
    ///    PENDING): each order's events were applied in the order written.
    #[command(verbatim_doc_comment)]
    Reconcile(ReconcileArgs),
}

/// The settings of `order-service reconcile`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// How long an order may stay PENDING, and an outbox event pending, before
    /// it counts as stuck (`60s`, `5m`). Keep it above the longest delay you
    /// tolerate: a broker outage, a consumer backlog.
    #[arg(long, env = "RECONCILE_PENDING_AFTER", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub pending_after: Duration,

    /// The consumer's dedup window (its DEDUP_WINDOW): message ids of orders
    /// decided within it must still be in processed_messages.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "7d",
          value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// The consumer's name in processed_messages (its CONSUMER_NAME).
    #[arg(long, env = "CONSUMER_NAME", default_value = "inventory")]
    pub consumer: String,

    /// Print the report as one JSON object instead of lines of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum OutboxCommand {
    /// List dead events (those that reached the attempt limit), oldest first, as JSON lines.
    Dead {
        /// Most events to list.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Make a dead event (or all of them) pending again, with a fresh attempt budget.
    Replay {
        /// The event's message id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<Uuid>,
        /// Replay every dead event.
        #[arg(long)]
        all: bool,
    },
}

/// How orders are written (group commit).
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// Most orders written in one transaction. Concurrent requests share a
    /// transaction and its commit; a lone request is written at once, never kept
    /// waiting for company. 1 writes each order in a transaction of its own.
    #[arg(long, env = "WRITE_BATCH_MAX", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub write_batch_max: u16,

    /// Transactions writing orders at once (each a batch); each holds one of the
    /// API's database connections while it writes. With WRITE_BATCH_MAX=1, raise
    /// it (to DB_MAX_CONNECTIONS, say), or orders are written two at a time.
    #[arg(long, env = "WRITE_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub write_concurrency: u16,

    /// Longest a batch's transaction may take, from taking a connection to the
    /// answer to its COMMIT (`5s`, `500ms`). Before COMMIT is sent, giving up
    /// means nothing was written (503 database_unavailable). When the answer to
    /// COMMIT is late or lost, the outcome is asked of the database for as long
    /// again: committed is 201, rolled back 503 database_unavailable, not known
    /// 503 commit_outcome_unknown. A request whose order is in a batch is
    /// answered by that outcome, not by REQUEST_TIMEOUT_MS.
    #[arg(long, env = "COMMIT_DEADLINE", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub commit_deadline: Duration,

    /// NOTIFY the outbox channel with every write, for relays that run in other
    /// processes and LISTEN. Off by default: the in-process relay is woken
    /// directly, and NOTIFY serialises all notifying commits on one lock.
    #[arg(long, env = "OUTBOX_NOTIFY", default_value_t = false,
          value_parser = clap::builder::FalseyValueParser::new())]
    pub outbox_notify: bool,
}

/// The in-process relay pool.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Relay workers publishing outbox events (0 runs the API without a relay).
    #[arg(long, env = "RELAY_WORKERS", default_value_t = 2)]
    pub relay_workers: usize,

    /// Connections of the relay's own pool, apart from the API's, so neither can
    /// starve the other: one per worker, one for LISTEN, one for the sweeper.
    #[arg(long, env = "RELAY_DB_MAX_CONNECTIONS", default_value_t = 4)]
    pub relay_db_max_connections: u32,

    /// Most events a worker publishes per transaction.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 200)]
    pub relay_batch_size: i64,

    /// How often an idle worker looks for due events without being woken: events
    /// written by other processes, retries whose backoff ended. The API's own
    /// writes wake the relay at once.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 100)]
    pub relay_poll_interval_ms: u64,

    /// Failed publish attempts after which an event is marked dead. Only the
    /// event's own failures count (nacked while others are confirmed, returned,
    /// a channel closed by it); a broker outage, stall or alarm spends none.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 10)]
    pub relay_max_attempts: i32,

    /// How long the broker has to take and confirm a batch. A batch it does not
    /// confirm in time is the broker's stall, not the events' failure: no
    /// attempt is spent, and the relay backs off as a whole.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT_MS", default_value_t = 10_000)]
    pub relay_confirm_timeout_ms: u64,

    /// The broker the relay publishes to: `rabbitmq` (the exchange EXCHANGE,
    /// the inventory consumer's queue declared on connect) or `kafka` (topic
    /// KAFKA_TOPIC_PREFIX + `order`, key = order id, at KAFKA_BROKERS; read
    /// by inventory-consumer with CONSUMER_TRANSPORT=kafka).
    #[arg(long, env = "RELAY_TRANSPORT", default_value = "rabbitmq")]
    pub relay_transport: TransportKind,

    /// Kafka: comma-separated `host:port` of the bootstrap brokers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// Kafka: topics are this prefix + the aggregate type (`outbox.order`).
    /// order-service creates its topic at start when it is missing (the relay
    /// itself never creates topics: an event for a missing one waits).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = outbox::kafka::DEFAULT_TOPIC_PREFIX)]
    pub kafka_topic_prefix: String,

    /// KAFKA_PARTITIONS and KAFKA_REPLICATION_FACTOR of the topic it creates.
    #[command(flatten)]
    pub kafka_topics: service_kit::kafka::TopicSettings,

    /// What becomes of an event no queue is bound for: `park` (marked dead at
    /// once, listed by `dead-events`, published by `replay` once a queue is
    /// bound) or `retry` (tried again every RELAY_RETRY_MAX_MS, never dead). The
    /// inventory queue is declared by this service, so its events are routed.
    #[arg(long, env = "RELAY_UNROUTABLE", default_value = "park")]
    pub relay_unroutable: Unroutable,

    /// Delay before the first retry of a failed event; it doubles with each attempt.
    #[arg(long, env = "RELAY_RETRY_BASE_MS", default_value_t = 1_000)]
    pub relay_retry_base_ms: u64,

    /// Longest delay between two attempts of an event.
    #[arg(long, env = "RELAY_RETRY_MAX_MS", default_value_t = 300_000)]
    pub relay_retry_max_ms: u64,

    /// A worker's claim starts this far before the newest event it claimed, so it
    /// skips the index entries of deleted events; an event whose transaction took
    /// longer to commit waits for the next full scan.
    #[arg(long, env = "RELAY_CLAIM_LOOKBACK", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub relay_claim_lookback: Duration,

    /// Largest event the relay publishes, in bytes (payload, header names and
    /// values, routing key). A larger one is parked dead at once, its
    /// last_error naming this limit, instead of being refused by the broker.
    /// Keep it below the broker's limit (RabbitMQ's max_message_size: 128 MiB;
    /// Kafka's message.max.bytes: about 1 MB).
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = outbox::relay::DEFAULT_MAX_MESSAGE_BYTES)]
    pub relay_max_message_bytes: usize,

    /// How often a worker's claim scans all due events instead of starting at
    /// its floor; a scan that finds late commits is followed by more at once,
    /// until none is left.
    #[arg(long, env = "RELAY_FULL_SCAN_INTERVAL", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub relay_full_scan_interval: Duration,
}

/// Which broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// RabbitMQ with publisher confirms (the default).
    Rabbitmq,
    /// Kafka, acknowledged by all in-sync replicas.
    Kafka,
}

impl Config {
    pub fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            max_batch: usize::from(self.write.write_batch_max),
            concurrency: usize::from(self.write.write_concurrency),
            write: WriteOptions {
                notify: self.write.outbox_notify,
                commit_deadline: self.write.commit_deadline,
            },
        }
    }

    /// The relay's settings; checked by `RelayConfig::validate` at start-up.
    pub fn relay_config(&self) -> RelayConfig {
        let relay = &self.relay;
        RelayConfig {
            workers: relay.relay_workers,
            batch_size: relay.relay_batch_size,
            poll_interval: Duration::from_millis(relay.relay_poll_interval_ms),
            max_attempts: relay.relay_max_attempts,
            unroutable: relay.relay_unroutable,
            retry_base: Duration::from_millis(relay.relay_retry_base_ms),
            retry_max: Duration::from_millis(relay.relay_retry_max_ms),
            claim_lookback: relay.relay_claim_lookback,
            full_scan_interval: relay.relay_full_scan_interval,
            max_message_bytes: relay.relay_max_message_bytes,
            crash_switch: Default::default(),
        }
    }

    /// Kafka at KAFKA_BROKERS, topics KAFKA_TOPIC_PREFIX + aggregate type.
    pub fn kafka_transport(&self) -> outbox::Result<KafkaTransport> {
        KafkaTransport::new(&self.relay.kafka_brokers)
            .topic_prefix(self.relay.kafka_topic_prefix.clone())
            .produce_timeout(Duration::from_millis(self.relay.relay_confirm_timeout_ms))
    }

    /// RabbitMQ, declaring the inventory consumer's queue on every connection,
    /// so that orders placed before the consumer first starts are routed to it.
    pub fn relay_transport(&self) -> outbox::Result<RabbitMq> {
        let inventory = self.broker.inventory_topology();
        RabbitMq::new(self.broker.amqp_url.clone(), self.broker.exchange.clone())
            .confirm_timeout(Duration::from_millis(self.relay.relay_confirm_timeout_ms))
            .map(|transport| {
                transport.with_topology(move |channel| {
                    let inventory = inventory.clone();
                    Box::pin(async move { inventory.declare(&channel).await })
                })
            })
    }
}

/// An `http://` or `https://` URL.
fn parse_http_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|error| format!("not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(format!("{text:?} is not an http:// or https:// address"));
    }
    Ok(url)
}
