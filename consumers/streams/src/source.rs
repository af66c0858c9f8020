//! What a shard poller needs from a stream service: one trait, one module per service.

use std::cmp::Ordering;
use toolrank_engine::Engine;
use toolrank_live::Summary;

/// A shard as listed by the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parent: Option<String>,
    /// Kinesis only: the second parent of a merged shard.
    pub adjacent_parent: Option<String>,
}

/// One page of a shard.
pub struct Page<R> {
    pub records: Vec<R>,
    /// `None`: the shard is closed and fully read.
    pub next: Option<String>,
}

/// A stream record, decoded when it is applied.
pub trait StreamRecord {
    /// Its sequence number in the shard (a decimal string).
    fn sequence(&self) -> &str;
    /// Decodes and applies it, returning when the change was made (Unix milliseconds)
    /// if known; `Err` is the reason it was rejected.
    fn apply(&self, engine: &mut Engine, summary: &mut Summary) -> Result<Option<i64>, String>;
    /// Its text, for the dead-letter file.
    fn describe(&self) -> String;
    /// Its size in bytes as the stream counts it, for `--max-record-bytes`.
    fn size(&self) -> usize;
}

/// Why a shard iterator could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The iterator is older than its 15 minutes (or 5, for Kinesis): get a new one.
    #[error("shard iterator expired")]
    Expired,
    /// The position is older than the stream's retention: those records are gone.
    #[error("records trimmed: {0}")]
    Trimmed(String),
    #[error("{0}")]
    Other(String),
}

/// A stream service: DynamoDB Streams or Kinesis Data Streams.
#[allow(async_fn_in_trait)]
pub trait ShardSource {
    type Record: StreamRecord;
    /// A name for logs and scopes (the stream's ARN or name).
    fn name(&self) -> &str;
    /// Every shard the service lists, open and closed.
    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError>;
    /// An iterator after `after`, or at the oldest record when `None`.
    async fn iterator(&self, shard: &str, after: Option<&str>) -> Result<String, SourceError>;
    /// The records at `iterator`.
    async fn read(&self, iterator: &str) -> Result<Page<Self::Record>, SourceError>;
}

/// Orders two sequence numbers: decimal strings of any length (Kinesis ones exceed u128).
pub fn compare_sequences(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_compare_as_numbers() {
        assert_eq!(compare_sequences("000000000000000000009", "10"), Ordering::Less);
        assert_eq!(
            compare_sequences("49590338271490256608559692538361571095921575989136588898", "49590338271490256608559692538361571095921575989136588899"),
            Ordering::Less
        );
        assert_eq!(compare_sequences("12", "012"), Ordering::Equal);
    }
}
