//! Backfill: the table's current items, read by a parallel Scan ([`scan`]) or from a
//! DynamoDB export ([`export`]), published onto the events topic as *base copies*.
//!
//! A base copy is an INSERT stream record with sequence number 0 ([`BASE_SEQ`]): the
//! consumers apply it only to keys they hold nothing for (no row, no tombstone). Every
//! live change outranks it, so the two sources commute: whichever arrives first, the
//! consumer ends with the item's latest state. A copy read before a later change is
//! overridden by that change; a copy of an item removed since is stale behind the removal's
//! tombstone; an item untouched since the scan is filled in by its copy. Publishing onto
//! the topic (keyed by the item's PK, like every record) puts each copy in the partition
//! and the consumer state that own its key, with the consumers' exactly-once checkpoints.
//!
//! Both readers checkpoint their position (per Scan segment: LastEvaluatedKey; per export:
//! file and line) in the state table after the records before it are acknowledged by the
//! broker, so a killed backfill resumes there; what it publishes twice is a base copy of
//! the same state, which changes nothing.
//!
//! The records go to a [`Target`]: the events topic ([`Kafka`]), or anything else that
//! takes records in order and says when they are durable (the Lambda function's bucket
//! logs, wired by the CLI).
//!
//! [`BASE_SEQ`]: toolrank_events::BASE_SEQ

pub mod export;
pub mod s3;
pub mod scan;

use std::future::Future;

use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a backfill stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dynamo(#[from] toolrank_dynamodb::Error),
    #[error(transparent)]
    Kafka(#[from] toolrank_kafka::Error),
    #[error(transparent)]
    Source(#[from] toolrank_source_file::SourceError),
    #[error("{0}")]
    Input(String),
}

/// The stream-record line of a base copy of an item (its typed-JSON image as text).
pub fn base_record(pk: &Value, sk: &Value, image: &str) -> String {
    change_record(pk, sk, Some(image), "0")
}

/// The stream-record line of a change at `sequence`: an INSERT of `image`, or without one
/// a REMOVE of the keys.
pub fn change_record(pk: &Value, sk: &Value, image: Option<&str>, sequence: &str) -> String {
    match image {
        Some(image) => format!(
            r#"{{"eventName":"INSERT","eventSource":"toolrank:backfill","dynamodb":{{"Keys":{{"PK":{pk},"SK":{sk}}},"NewImage":{image},"SequenceNumber":"{sequence}"}}}}"#
        ),
        None => {
            format!(r#"{{"eventName":"REMOVE","eventSource":"toolrank:backfill","dynamodb":{{"Keys":{{"PK":{pk},"SK":{sk}}},"SequenceNumber":"{sequence}"}}}}"#)
        }
    }
}

/// Where a backfill's records go. Each Scan segment (and an export) opens a sender of its own.
pub trait Target {
    type Sender: Sender;
    fn sender(&self) -> Result<Self::Sender, Error>;
}

/// Takes records in order; `settle` returns once every record sent before is durable, so
/// a checkpoint after it never skips one.
pub trait Sender {
    /// Queues one record (keyed by its item's PK).
    fn send(&mut self, key: Option<&str>, record: &[u8]) -> impl Future<Output = Result<(), Error>>;
    fn settle(&mut self) -> impl Future<Output = Result<(), Error>>;
    /// Settles and closes; returns how many records had to be sent again.
    fn finish(self) -> impl Future<Output = Result<u64, Error>>;
}

/// The events topic: the live consumers read the copies among the live changes.
pub struct Kafka {
    pub kafka: toolrank_kafka::Connection,
    pub topic: String,
}

impl Target for Kafka {
    type Sender = toolrank_kafka::Publisher;
    fn sender(&self) -> Result<toolrank_kafka::Publisher, Error> {
        Ok(toolrank_kafka::Publisher::new(&self.kafka, &self.topic)?)
    }
}

impl Sender for toolrank_kafka::Publisher {
    async fn send(&mut self, key: Option<&str>, record: &[u8]) -> Result<(), Error> {
        Ok(toolrank_kafka::Publisher::send(self, key, record).await?)
    }
    async fn settle(&mut self) -> Result<(), Error> {
        Ok(toolrank_kafka::Publisher::settle(self).await?)
    }
    async fn finish(self) -> Result<u64, Error> {
        Ok(toolrank_kafka::Publisher::finish(self).await?.1)
    }
}

/// What every backfill shares: where its checkpoints go and how often, what it reports
/// progress to, and the flag that stops it cleanly.
pub struct Run<'a> {
    pub store: toolrank_state::CheckpointStore,
    /// The checkpoints' scope (a Scan's segments: `{scope}/segment/{i}`).
    pub scope: String,
    pub owner: String,
    pub checkpoint_every: Duration,
    pub progress: &'a Progress,
    pub stop: &'a std::sync::atomic::AtomicBool,
}

/// Counters a progress bar and the summary read while the backfill runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub items: AtomicU64,
    /// Bad items dead-lettered.
    pub dead_letters: AtomicU64,
    /// Read capacity units the Scan consumed (as reported by DynamoDB), in thousandths.
    pub rcu_milli: AtomicU64,
}

impl Progress {
    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }
    pub fn rcu(&self) -> f64 {
        self.rcu_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_record_decodes_as_an_insert_with_sequence_zero() {
        let line = base_record(
            &serde_json::json!({"S": "U#S"}),
            &serde_json::json!({"S": "P#A#T"}),
            r#"{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"EntityType":{"S":"UserSessPrcToolMappHist"},"TransactDT":{"S":"20250614140605"},"SuccYN":{"S":"Y"},"ToolNM":{"S":"X"}}"#,
        );
        let mut changes = Vec::new();
        toolrank_events::decode_line(line.as_bytes(), &mut |r| changes.push(r.result.unwrap().into_owned())).unwrap();
        assert_eq!(changes[0].seq, Some(toolrank_events::BASE_SEQ));
        assert_eq!((changes[0].pk.as_ref(), changes[0].sk.as_ref()), ("U#S", "P#A#T"));
    }
}
