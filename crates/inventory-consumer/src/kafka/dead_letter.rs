//! The dead-letter topic `<KAFKA_TOPIC_PREFIX>order.dlq` for operators: what
//! `inventory-consumer dlq list|replay` and the admin API do on Kafka.
//!
//! A topic is a log: nothing leaves it. So a replay appends, in this order,
//! the record to the events topic (on the partition it died on, with its
//! headers, less those of its death) and then a **marker** to the dead-letter
//! topic: a record without a value whose [`REPLAYED_HEADER`] names the offset
//! of the letter it undoes. The letters are the records without a marker. A
//! replay cut between the two leaves the letter in both topics, never in
//! neither; the consumer ignores an event it already applied. Like the
//! RabbitMQ tools, these need only the broker, never the database.
//!
//! The consumer writes each letter with [`DEATHS_HEADER`] and
//! [`FIRST_DEATH_HEADER`], carried over from an earlier death, so that a letter
//! replayed and dead again says how often and since when it has been failing.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::record::{Record, RecordAndOffset};

use super::header as text;
use crate::config::KafkaConfig;
use crate::dead_letter::{DeadLetter, REASON_HEADER, Replayed, Selection};

/// The header of a marker: the offset of the letter it marks as replayed.
pub const REPLAYED_HEADER: &str = "x-replayed-offset";
/// Times the event was dead-lettered, this time included.
pub const DEATHS_HEADER: &str = "x-deaths";
/// When it was first dead-lettered (RFC 3339).
pub const FIRST_DEATH_HEADER: &str = "x-first-death-at";
/// Where the consumer found it: topic, partition and offset.
pub const ORIGINAL_TOPIC_HEADER: &str = "x-original-topic";
pub const ORIGINAL_PARTITION_HEADER: &str = "x-original-partition";
pub const ORIGINAL_OFFSET_HEADER: &str = "x-original-offset";

/// The dead-letter topic has one partition.
pub const PARTITION: i32 = 0;
/// The longest wait of one fetch of the dead-letter topic.
const FETCH_WAIT_MS: i32 = 100;
const FETCH_MAX_BYTES: i32 = 4 * 1024 * 1024;
/// How long the broker has to take each produce of a replay.
const PRODUCE_DEADLINE: Duration = Duration::from_secs(10);
/// Letters sent back per produce (a produce is one record batch, which the
/// broker refuses above its `max.message.bytes`).
const REPLAY_CHUNK: usize = 100;

/// The headers a letter carries about its death, dropped by a replay.
const DEATH_ONLY: [&str; 4] =
    [REASON_HEADER, ORIGINAL_TOPIC_HEADER, ORIGINAL_PARTITION_HEADER, ORIGINAL_OFFSET_HEADER];

/// `record` (found at `offset` of `partition` of `topic`) as the letter the
/// consumer writes to the dead-letter topic, dead for `reason`.
pub fn letter(record: &Record, topic: &str, partition: i32, offset: i64, reason: &str) -> Record {
    let mut letter = record.clone();
    let now = Utc::now();
    let deaths = text(record, DEATHS_HEADER).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) + 1;
    let first_death = text(record, FIRST_DEATH_HEADER)
        .map(str::to_owned)
        .unwrap_or_else(|| now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let headers = [
        (REASON_HEADER, reason.to_owned()),
        (ORIGINAL_TOPIC_HEADER, topic.to_owned()),
        (ORIGINAL_PARTITION_HEADER, partition.to_string()),
        (ORIGINAL_OFFSET_HEADER, offset.to_string()),
        (DEATHS_HEADER, deaths.to_string()),
        (FIRST_DEATH_HEADER, first_death),
    ];
    for (name, value) in headers {
        letter.headers.insert(name.to_owned(), value.into_bytes());
    }
    letter.timestamp = now;
    letter
}

/// A letter as [`DeadLetter`] shows it.
pub fn describe(record: &Record) -> DeadLetter {
    DeadLetter {
        message_id: text(record, "message_id").map(str::to_owned),
        reason: text(record, REASON_HEADER).unwrap_or("unknown").to_owned(),
        deaths: text(record, DEATHS_HEADER).and_then(|n| n.parse().ok()).unwrap_or(1),
        first_death_at: text(record, FIRST_DEATH_HEADER)
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&Utc))
            .or(Some(record.timestamp)),
        kind: text(record, "type").map(str::to_owned),
        routing_key: None,
    }
}

/// The letters among `records` (a whole dead-letter topic, in offset order):
/// the records no marker names.
pub fn letters(records: Vec<RecordAndOffset>) -> Vec<RecordAndOffset> {
    let replayed: HashSet<i64> = records
        .iter()
        .filter_map(|record| text(&record.record, REPLAYED_HEADER)?.parse().ok())
        .collect();
    records
        .into_iter()
        .filter(|record| {
            !record.record.headers.contains_key(REPLAYED_HEADER)
                && !replayed.contains(&record.offset)
        })
        .collect()
}

/// The record a replay sends back to the events topic: the letter without the
/// headers of its death (its count and first time stay).
pub fn revived(letter: &Record) -> Record {
    let mut record = letter.clone();
    for name in DEATH_ONLY {
        record.headers.remove(name);
    }
    record.timestamp = Utc::now();
    record
}

/// The marker of the letter at `offset`.
pub fn marker(offset: i64) -> Record {
    Record {
        key: None,
        value: None,
        headers: BTreeMap::from([(REPLAYED_HEADER.to_owned(), offset.to_string().into_bytes())]),
        timestamp: Utc::now(),
    }
}

/// Up to `limit` letters of the dead-letter topic, oldest first.
pub async fn list(config: &KafkaConfig, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let client = super::connect(config, "inventory-consumer-dlq").await?;
    let topic = dead_letter_client(&client, config).await?;
    let letters = letters(read_all(&topic).await?);
    Ok(letters.iter().take(limit).map(|letter| describe(&letter.record)).collect())
}

/// Sends the `selection` of the letters back to the events topic, each on the
/// partition it died on, and marks each replayed once the broker took it.
pub async fn replay(config: &KafkaConfig, selection: &Selection) -> anyhow::Result<Replayed> {
    let client = super::connect(config, "inventory-consumer-dlq").await?;
    let dead_letters = dead_letter_client(&client, config).await?;
    let chosen: Vec<RecordAndOffset> = letters(read_all(&dead_letters).await?)
        .into_iter()
        .filter(|letter| match selection {
            Selection::All => true,
            Selection::Id(id) => text(&letter.record, "message_id") == Some(id.as_str()),
        })
        .collect();
    let mut by_partition: BTreeMap<i32, Vec<&RecordAndOffset>> = BTreeMap::new();
    for letter in &chosen {
        let partition = text(&letter.record, ORIGINAL_PARTITION_HEADER)
            .and_then(|partition| partition.parse().ok())
            .unwrap_or(0);
        by_partition.entry(partition).or_default().push(letter);
    }
    let mut done = Replayed { replayed: 0, failed: 0 };
    let mut chunks: Vec<(i32, &[&RecordAndOffset])> = Vec::new();
    for (partition, letters) in &by_partition {
        chunks.extend(letters.chunks(REPLAY_CHUNK).map(|chunk| (*partition, chunk)));
    }
    for (partition, chunk) in chunks {
        if done.failed > 0 {
            // After the first refusal nothing more is tried: it all stays.
            done.failed += chunk.len();
            continue;
        }
        let events = client
            .partition_client(config.topic(), partition, UnknownTopicHandling::Error)
            .await
            .with_context(|| format!("no client for {}/{partition}", config.topic()))?;
        let records = chunk.iter().map(|letter| revived(&letter.record)).collect();
        if let Err(error) = produce(&events, records).await {
            tracing::warn!(error = format!("{error:#}"), partition, "a replay was not taken");
            done.failed += chunk.len();
            continue;
        }
        let markers = chunk.iter().map(|letter| marker(letter.offset)).collect();
        if let Err(error) = produce(&dead_letters, markers).await {
            anyhow::bail!(
                "{} letter(s) replayed; {} more are back on their topic, but the dead-letter \
                 topic did not take their markers ({error:#}): they are listed still, and a \
                 second replay sends them again (the consumer applies each once)",
                done.replayed,
                chunk.len()
            );
        }
        done.replayed += chunk.len();
    }
    Ok(done)
}

async fn dead_letter_client(
    client: &rskafka::client::Client,
    config: &KafkaConfig,
) -> anyhow::Result<PartitionClient> {
    let topic = config.dead_letter_topic();
    client
        .partition_client(topic.clone(), PARTITION, UnknownTopicHandling::Error)
        .await
        .with_context(|| {
            format!(
                "the dead-letter topic {topic:?} does not exist (the consumer creates it when it \
                 starts; check KAFKA_TOPIC_PREFIX)"
            )
        })
}

/// Every record of a partition, from its earliest offset to its end as it was
/// when the read began.
pub async fn read_all(partition: &PartitionClient) -> anyhow::Result<Vec<RecordAndOffset>> {
    let mut offset = partition.get_offset(OffsetAt::Earliest).await?;
    let end = partition.get_offset(OffsetAt::Latest).await?;
    let mut records = Vec::new();
    while offset < end {
        let (fetched, _) = partition
            .fetch_records(offset, 1..FETCH_MAX_BYTES, FETCH_WAIT_MS)
            .await
            .with_context(|| format!("cannot read the dead-letter topic from offset {offset}"))?;
        let before = records.len();
        records.extend(fetched.into_iter().filter(|record| record.offset >= offset));
        match records[before..].iter().map(|record| record.offset).max() {
            Some(last) => offset = last + 1,
            // Nothing at or past `offset` although it is below the end: a gap
            // the broker does not serve (compaction, a transaction marker).
            None => break,
        }
    }
    records.sort_by_key(|record| record.offset);
    records.truncate(records.partition_point(|record| record.offset < end));
    Ok(records)
}

async fn produce(partition: &PartitionClient, records: Vec<Record>) -> anyhow::Result<()> {
    match tokio::time::timeout(
        PRODUCE_DEADLINE,
        partition.produce(records, Compression::NoCompression),
    )
    .await
    {
        Ok(produced) => produced.map(drop).map_err(anyhow::Error::from),
        Err(_) => anyhow::bail!("no answer from Kafka within {PRODUCE_DEADLINE:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(message_id: &str) -> Record {
        Record {
            key: Some(b"order-1".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: BTreeMap::from([
                ("message_id".to_owned(), message_id.as_bytes().to_vec()),
                ("type".to_owned(), b"OrderPlaced".to_vec()),
            ]),
            timestamp: Utc::now(),
        }
    }

    fn at(offset: i64, record: Record) -> RecordAndOffset {
        RecordAndOffset { record, offset }
    }

    #[test]
    fn a_letter_says_why_where_and_how_often_and_a_second_death_counts_on() {
        let first = letter(&event("m-1"), "t.order", 3, 17, "unknown SKU");
        let shown = describe(&first);
        assert_eq!(shown.message_id.as_deref(), Some("m-1"));
        assert_eq!(shown.reason, "unknown SKU");
        assert_eq!(shown.deaths, 1);
        assert_eq!(shown.kind.as_deref(), Some("OrderPlaced"));
        assert_eq!(text(&first, ORIGINAL_PARTITION_HEADER), Some("3"));

        let back = revived(&first);
        for name in DEATH_ONLY {
            assert!(!back.headers.contains_key(name), "{name} stays after a replay");
        }
        assert_eq!(back.key, first.key);
        let second = letter(&back, "t.order", 3, 40, "still unknown");
        let shown_again = describe(&second);
        assert_eq!(shown_again.deaths, 2);
        assert_eq!(shown_again.first_death_at, shown.first_death_at);
        assert_eq!(shown_again.reason, "still unknown");
    }

    #[test]
    fn a_marked_letter_and_the_markers_are_not_letters() {
        let topic = vec![
            at(0, letter(&event("m-1"), "t", 0, 1, "r")),
            at(1, letter(&event("m-2"), "t", 0, 2, "r")),
            at(2, marker(0)),
            at(3, letter(&event("m-1"), "t", 0, 9, "again")),
        ];
        let left: Vec<i64> = letters(topic).iter().map(|letter| letter.offset).collect();
        assert_eq!(left, [1, 3]);
    }
}
