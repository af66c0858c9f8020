//! Kafka for toolrank: creating the topics, and publishing history records keyed by the
//! hist item's PK (`user#session`) so that one session stays in one partition, in order.
//!
//! Settings known to work with the local tansu broker: no compression (or lz4), no
//! idempotence or transactions.

mod connection;
mod context;
pub mod msk_iam;

pub use connection::{property, read_properties, Connection, Error as ConnectionError};
pub use context::Context;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::VecDeque;
use std::time::Duration;
use toolrank_events::{decode_line, Record};

/// A Kafka failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to Kafka at {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("connecting to Kafka at {brokers}: no OAUTHBEARER token: {cause}")]
    Token { brokers: String, cause: String },
    #[error("creating topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
    #[error("publishing to {topic}: {source}")]
    Publish { topic: String, source: KafkaError },
}

/// How long a fetch that finds nothing new may wait on the broker, in milliseconds
/// (librdkafka's default is 500). Kafka answers as soon as data arrives, so there it only
/// paces idle polling; some brokers (tansu) answer at the deadline, so it adds to every
/// record's delivery: at 20 ms the local broker delivered at p50 32 ms, p99 47 ms, at
/// 5 ms p50 14–16 ms, p99 31–35 ms (5,000 records/s).
pub const FETCH_WAIT_MS: u64 = 5;

/// Whether a topic was made or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    Created,
    Existed,
}

/// Creates each `(name, partitions)` topic unless it exists. Idempotent.
pub async fn create_topics(kafka: &Connection, topics: &[(&str, i32)]) -> Result<Vec<(String, TopicStatus)>, Error> {
    let brokers = &kafka.brokers;
    let context = kafka.context();
    let admin: AdminClient<Context> =
        kafka.client_config().create_with_context(context.clone()).map_err(|source| Error::Client { brokers: brokers.into(), source })?;
    context.give_token(admin.inner()).map_err(|cause| Error::Token { brokers: brokers.into(), cause })?;
    let new: Vec<NewTopic> = topics.iter().map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await.map_err(|source| Error::Client { brokers: brokers.into(), source })?;
    results
        .into_iter()
        .map(|r| match r {
            Ok(name) => Ok((name, TopicStatus::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => Ok((name, TopicStatus::Existed)),
            Err((topic, code)) => Err(Error::CreateTopic { topic, code }),
        })
        .collect()
}

/// The Kafka key of one history record: the PK of the item it changes, which for hist
/// items is `user#session`. `None` for input that does not decode (it is still
/// published, so that consumers dead-letter it where operators look).
pub fn record_key(line: &[u8]) -> Option<String> {
    let mut key = None;
    let ok = decode_line(line, &mut |rec: Record<'_>| {
        if let Ok(change) = rec.result {
            key = Some(change.pk.into_owned());
        }
    });
    ok.ok().and(key)
}

/// Splits a line into publishable records: a Lambda event becomes its records (each with
/// its own key), any other line is one record.
pub fn records(line: &[u8]) -> Vec<(Option<String>, Vec<u8>)> {
    let mut parts: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut batch = false;
    let _ = decode_line(line, &mut |rec: Record<'_>| {
        if let Some(raw) = rec.raw {
            batch = true;
            parts.push((rec.result.ok().map(|c| c.pk.into_owned()), raw.as_bytes().to_vec()));
        }
    });
    if batch {
        parts
    } else {
        vec![(record_key(line), line.to_vec())]
    }
}

/// Publishes records to one topic with a bounded number in flight, reporting failures.
pub struct Publisher {
    producer: FutureProducer<Context>,
    topic: std::sync::Arc<str>,
    in_flight: VecDeque<InFlight>,
    published: u64,
    /// Deliveries that failed and were sent again.
    resent: u64,
    paused: Option<std::time::Instant>,
    /// The pauses between bursts of failed deliveries: jittered, growing while the
    /// failures go on, from the start again after a quiet minute.
    backoff: toolrank_backoff::Backoff,
}

/// A record awaiting its acknowledgement, kept to send it again if delivery fails.
struct InFlight {
    delivery: rdkafka::producer::DeliveryFuture,
    key: Option<String>,
    payload: Vec<u8>,
    /// When its delivery first failed.
    failing_since: Option<std::time::Instant>,
}

/// How long a record's delivery is retried (a stopping broker fails every request in
/// flight until it is gone, then requests wait for it to come back).
const RETRY_FOR: Duration = Duration::from_secs(120);

const MAX_IN_FLIGHT: usize = 10_000;

impl Publisher {
    pub fn new(kafka: &Connection, topic: &str) -> Result<Publisher, Error> {
        let producer: FutureProducer<Context> = kafka
            .client_config()
            .set("compression.type", "none")
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create_with_context(kafka.context())
            .map_err(|source| Error::Client { brokers: kafka.brokers.clone(), source })?;
        Ok(Publisher {
            producer,
            topic: topic.into(),
            in_flight: VecDeque::new(),
            published: 0,
            resent: 0,
            paused: None,
            backoff: toolrank_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        })
    }

    /// Queues one record, waiting for the oldest delivery when too many are in flight.
    pub async fn send(&mut self, key: Option<&str>, payload: &[u8]) -> Result<(), Error> {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_one().await?;
        }
        self.enqueue(key.map(str::to_owned), payload.to_vec(), None).await
    }

    async fn enqueue(&mut self, key: Option<String>, payload: Vec<u8>, failing_since: Option<std::time::Instant>) -> Result<(), Error> {
        let topic = self.topic.clone();
        loop {
            let mut record = FutureRecord::<str, [u8]>::to(&topic).payload(&payload);
            if let Some(k) = &key {
                record = record.key(k);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back(InFlight { delivery, key, payload, failing_since });
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.settle_one().await? {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Err((source, _)) => return Err(Error::Publish { topic: topic.to_string(), source }),
            }
        }
    }

    /// Waits for the oldest delivery; a failed one is sent again (at-least-once: the
    /// consumers treat a record delivered twice as a redelivery).
    async fn settle_one(&mut self) -> Result<bool, Error> {
        let Some(f) = self.in_flight.pop_front() else { return Ok(false) };
        let source = match f.delivery.await {
            Ok(Ok(_)) => {
                self.published += 1;
                return Ok(true);
            }
            Ok(Err((source, _))) => source,
            Err(_) => KafkaError::Canceled,
        };
        let since = f.failing_since.unwrap_or_else(std::time::Instant::now);
        if since.elapsed() > RETRY_FOR {
            return Err(Error::Publish { topic: self.topic.to_string(), source });
        }
        // One pause (and one warning) per burst: failures come by the thousand when a
        // broker stops.
        if self.paused.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            tracing::warn!(topic = %self.topic, error = %source, "deliveries failed; sending them again");
            if self.paused.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                self.backoff = toolrank_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            }
            tokio::time::sleep(self.backoff.next_delay()).await;
            self.paused = Some(std::time::Instant::now());
        }
        self.resent += 1;
        Box::pin(self.enqueue(f.key, f.payload, Some(since))).await?;
        Ok(true)
    }

    /// Waits until every record queued so far is acknowledged (before a checkpoint that
    /// says they are published).
    pub async fn settle(&mut self) -> Result<(), Error> {
        while self.settle_one().await? {}
        Ok(())
    }

    /// Waits until every queued record is acknowledged; returns how many were, and how
    /// many deliveries were retried.
    pub async fn finish(mut self) -> Result<(u64, u64), Error> {
        self.settle().await?;
        self.producer.flush(Duration::from_secs(30)).map_err(|source| Error::Publish { topic: self.topic.to_string(), source })?;
        Ok((self.published, self.resent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_keyed_by_the_items_pk() {
        let flat = br#"{"op":"upsert","user_id":"U1","session_id":"S1","process_id":"P","domain_id":"D","agent_id":"A","tool_id":"T","tool_name":"x","success":true,"transact_dt":"20250614140605"}"#;
        assert_eq!(records(flat), vec![(Some("U1#S1".to_owned()), flat.to_vec())]);
        let lambda = br#"{"Records":[{"eventName":"REMOVE","dynamodb":{"Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}}}},{"eventName":"X"}]}"#;
        let got = records(lambda);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.as_deref(), Some("U#S"));
        assert_eq!(got[1], (None, br#"{"eventName":"X"}"#.to_vec()));
        assert_eq!(records(b"junk"), vec![(None, b"junk".to_vec())]);
    }
}
