//! The settings a live consumer's runtime takes.

use std::time::Duration;
use toolrank_events::Day;

/// What the sink writer needs besides its sinks.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The pipeline's state table (checkpoints, leases).
    pub state_table: String,
    /// Scores are written for this date; `None` is the UTC date at each write.
    pub today: Option<Day>,
    /// This consumer's identity in leases and checkpoints.
    pub owner: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How long a removed item's tombstone is kept ([`Engine::expire_tombstones`]).
    pub tombstone_horizon: Duration,
}

/// The settings every long-running consumer shares (its sinks come wired apart).
#[derive(Clone, Debug)]
pub struct LiveConfig {
    pub writer: WriterConfig,
    pub pacing: Pacing,
}

/// How often the loop's steps run.
#[derive(Clone, Debug)]
pub struct Pacing {
    /// Exit after this long without a record, once the whole input is read.
    pub until_idle: Option<Duration>,
    /// How often deltas reach Valkey (and the merged engine).
    pub flush_interval: Duration,
    /// How often the units are checkpointed.
    pub checkpoint_interval: Duration,
    /// How long checkpoints may wait while a backlog is read ([`crate::SinkWriter::stretched`]).
    pub checkpoint_max: Duration,
}

/// A week: longer than DynamoDB Streams (24 h) or Kinesis (24 h by default) keep a
/// record, as long as Kafka keeps a topic's messages by default.
pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);
