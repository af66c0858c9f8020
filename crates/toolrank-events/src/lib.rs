//! The wire formats toolrank accepts (SPEC §2) and the normalized changes they decode to.
//!
//! Every consumer — file replay, Kafka, DynamoDB Streams, Lambda, Kinesis — hands raw
//! bytes to [`decode_line`] and gets validated [`Change`]s or a [`DecodeError`] that says
//! what is wrong. Nothing here does I/O or keeps state; the engine never sees bad data.

mod attr;
mod change;
mod decode;
mod fast;
mod redact;
pub mod time;

pub use attr::{Attr, Image, Str};
pub use change::{Action, AgentItem, Change, Entity, Execution, HistKey, KeyError, AGENT_ENTITY, BASE_SEQ, HIST_ENTITY, METADATA_SK};
pub use decode::{decode_kinesis_data, decode_line, stream_record_change, DecodeError, Format, Record};
pub use fast::escape_at;
pub use redact::{without_values, KeyDigest};
pub use time::{Day, Timestamp};

/// A rejected input record as written to a dead-letter destination.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DeadLetter {
    /// The file, topic or stream it came from.
    pub source: String,
    /// 1-based line number (or offset, for brokers).
    pub line: u64,
    /// Index of the record inside a Lambda event line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub record: Option<usize>,
    /// The record's position in its source when a line number does not say it (a
    /// shard's sequence number).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub position: Option<String>,
    pub reason: String,
    /// The rejected text, lossily decoded when it was not UTF-8.
    pub raw: String,
}
