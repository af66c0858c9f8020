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
    /// Records larger than this are dead-lettered before they are decoded ([`oversized`]).
    pub max_record_bytes: usize,
    /// What a unit does when its input no longer holds its checkpoint's position.
    pub on_gap: OnGap,
}

/// What a unit does when its input no longer holds what follows its checkpoint: records
/// were deleted by retention before they were read, or the input ends before the
/// checkpoint's position (the topic was recreated, the state restored from elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnGap {
    /// The unit stops with an error that names it; the others go on (`--on-gap stop`).
    #[default]
    Stop,
    /// The unit reads on from the oldest record its input holds; what was skipped is
    /// logged and counted (`toolrank_source_gaps_total`) (`--on-gap skip`).
    Skip,
}

impl std::str::FromStr for OnGap {
    type Err = String;

    fn from_str(s: &str) -> Result<OnGap, String> {
        match s {
            "stop" => Ok(OnGap::Stop),
            "skip" => Ok(OnGap::Skip),
            other => Err(format!("{other:?}: expected stop or skip")),
        }
    }
}

/// What to do about a unit stopped at a gap.
pub const GAP_HINT: &str =
    "read on from the oldest record with --on-gap skip, then backfill from the table to fill the gap: docs/operations.md, Runbooks, Gaps";

/// Counts records a unit skipped at a gap (`--on-gap skip`).
pub fn count_gap(records: u64) {
    toolrank_metrics::counter!("toolrank_source_gaps_total").increment(records);
}

/// DynamoDB's item limit (400 KB): the default for `--max-record-bytes`.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 400 * 1024;

/// Why a record of `bytes` is refused under a limit of `max` (`--max-record-bytes`,
/// `TOOLRANK_MAX_RECORD_BYTES`), if it is: one oversized record must not cost a
/// consumer its memory or its decoder its time.
pub fn oversized(bytes: usize, max: usize) -> Option<String> {
    (bytes > max).then(|| format!("record of {bytes} bytes is larger than the limit of {max} (--max-record-bytes, TOOLRANK_MAX_RECORD_BYTES)"))
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
