//! `inventory-consumer dlq list|replay`: the dead letters for operators, in
//! RabbitMQ's dead-letter queue or, with `CONSUMER_TRANSPORT=kafka`, in the
//! dead-letter topic ([`crate::kafka::dead_letter`]).
//!
//! Both need only the broker (AMQP_URL and the queue names), never the database,
//! so they work while Postgres is down. Each opens a connection of its own, does
//! one pass over the dead-letter queue and closes it; whatever it took and did
//! not ack goes back to the queue, even if the command is killed half-way. The
//! mechanics, which know nothing of orders, are in [`crate::dead_letter`].

use std::io::Write;
use std::time::Duration;

use crate::dead_letter::{self, DeadLetter, Replayed, Selection};
use anyhow::Context;
use lapin::{Channel, Connection};
use service_kit::broker::BrokerConfig;

use crate::config::{Config, ConsumerTransport, DlqCommand, KafkaConfig};

/// How long the broker has to confirm each round of replayed messages.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Up to `limit` messages of the dead-letter queue, oldest first, left in place.
pub async fn list(broker: &BrokerConfig, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (connection, channel) = open(broker).await?;
    let listed = async {
        dead_letter::queue_depth(&channel, &broker.dead_letter_queue)
            .await
            .with_context(|| missing(broker))?;
        dead_letter::list(&channel, &broker.dead_letter_queue, limit)
            .await
            .context("cannot read the dead-letter queue")
    }
    .await;
    close(connection, channel).await;
    listed
}

/// Moves the `selection` of the dead-letter queue back to the inventory queue
/// (see [`dead_letter::replay`]).
pub async fn replay(broker: &BrokerConfig, selection: &Selection) -> anyhow::Result<Replayed> {
    let (connection, channel) = open(broker).await?;
    let replayed = dead_letter::replay(
        &channel,
        &broker.dead_letter_queue,
        &broker.inventory_queue,
        selection,
        CONFIRM_TIMEOUT,
    )
    .await
    .with_context(|| format!("cannot replay from {:?}", broker.dead_letter_queue));
    close(connection, channel).await;
    replayed
}

/// Where the dead letters are.
#[derive(Debug, Clone)]
pub enum Source {
    /// DEAD_LETTER_QUEUE, replayed to INVENTORY_QUEUE.
    Rabbitmq(BrokerConfig),
    /// `<KAFKA_TOPIC_PREFIX>order.dlq`, replayed to `<KAFKA_TOPIC_PREFIX>order`.
    Kafka(KafkaConfig),
}

impl Source {
    /// The dead letters of the transport `config` consumes from.
    pub fn of(config: &Config) -> Self {
        match config.consumer_transport {
            ConsumerTransport::Rabbitmq => Self::Rabbitmq(config.broker.clone()),
            ConsumerTransport::Kafka => Self::Kafka(config.kafka.clone()),
        }
    }

    /// Up to `limit` dead letters, oldest first, left in place.
    pub async fn list(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        match self {
            Self::Rabbitmq(broker) => list(broker, limit).await,
            Self::Kafka(kafka) => crate::kafka::dead_letter::list(kafka, limit).await,
        }
    }

    /// Sends the `selection` back to be consumed again.
    pub async fn replay(&self, selection: &Selection) -> anyhow::Result<Replayed> {
        match self {
            Self::Rabbitmq(broker) => replay(broker, selection).await,
            Self::Kafka(kafka) => crate::kafka::dead_letter::replay(kafka, selection).await,
        }
    }

    /// Where replayed letters go: the inventory queue or the events topic.
    pub fn target(&self) -> String {
        match self {
            Self::Rabbitmq(broker) => broker.inventory_queue.clone(),
            Self::Kafka(kafka) => kafka.topic(),
        }
    }

    /// Where the letters are: the dead-letter queue or topic.
    pub fn dead_letters(&self) -> String {
        match self {
            Self::Rabbitmq(broker) => broker.dead_letter_queue.clone(),
            Self::Kafka(kafka) => kafka.dead_letter_topic(),
        }
    }
}

impl From<&BrokerConfig> for Source {
    fn from(broker: &BrokerConfig) -> Self {
        Self::Rabbitmq(broker.clone())
    }
}

/// Runs `command` on the dead letters of `source`, writing what it has to say
/// to `out`.
pub async fn run(
    source: impl Into<Source>,
    command: &DlqCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let source = source.into();
    match command {
        DlqCommand::List { limit, json } => {
            for letter in source.list(*limit).await? {
                if *json {
                    writeln!(out, "{}", serde_json::to_string(&letter)?)?;
                } else {
                    writeln!(out, "{}", line(&letter))?;
                }
            }
        }
        DlqCommand::Replay { id, all: _ } => {
            // clap guarantees an id unless --all was given.
            let selection = id.clone().map_or(Selection::All, Selection::Id);
            let done = source.replay(&selection).await?;
            writeln!(out, "{} message(s) replayed to {:?}", done.replayed, source.target())?;
            if done.failed > 0 {
                anyhow::bail!(
                    "the broker did not confirm {} message(s); they stay in {:?}",
                    done.failed,
                    source.dead_letters()
                );
            }
            if let (Some(id), 0) = (id, done.replayed) {
                anyhow::bail!("no message with id {id} in {:?}", source.dead_letters());
            }
        }
    }
    Ok(())
}

/// One message as a line of text: id, deaths, first death, reason.
pub fn line(letter: &DeadLetter) -> String {
    let first_death = letter.first_death_at.map_or_else(
        || "-".to_owned(),
        |at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    format!(
        "{}  deaths={}  first_death_at={}  reason={:?}",
        letter.message_id.as_deref().unwrap_or("<no message id>"),
        letter.deaths,
        first_death,
        letter.reason,
    )
}

async fn open(broker: &BrokerConfig) -> anyhow::Result<(Connection, Channel)> {
    let connection =
        outbox::amqp::connect(&broker.amqp_url, "inventory-consumer-dlq").await.with_context(
            || format!("cannot connect to RabbitMQ at {}", outbox::amqp::redact(&broker.amqp_url)),
        )?;
    let channel = connection.create_channel().await.context("cannot open a channel")?;
    Ok((connection, channel))
}

/// Closing hands back whatever the channel still holds unacked.
async fn close(connection: Connection, channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
    if connection.status().connected() {
        let _ = connection.close(200, "done".into()).await;
    }
}

fn missing(broker: &BrokerConfig) -> String {
    format!(
        "the dead-letter queue {:?} does not exist (the consumer declares it when it starts; \
         check DEAD_LETTER_QUEUE)",
        broker.dead_letter_queue
    )
}
