//! What every live consumer (Kafka, DynamoDB Streams, Kinesis, Lambda) shares.
//!
//! A consumer divides its input into *units* (a Kafka partition, a shard lineage, a
//! Lambda bucket), each with its own [`Engine`] checkpointed together with its input
//! position under a *scope* of the state table. Units move between consumers with their
//! checkpoints. Every consumer is a [`Source`]: the long-running ones run one loop
//! ([`run`]), Lambda the same steps once per invocation ([`invoke`]); the rest is here,
//! in [`SinkWriter`]:
//! - **One writer.** One consumer holds the sink lease and writes the sinks from a merged
//!   engine: its own units' deltas plus the latest checkpoints of the units others own,
//!   so the sinks always show the sum over all units. Sink writes are absolute values
//!   (counts, dates, rank keys), so rewriting after a restart converges instead of double
//!   counting. The sinks are whatever the binary wires in ([`Wired`]: a
//!   [`toolrank_sink::Sink`] and its [`Pace`]); this crate knows none of them.
//! - **Deadlines.** Every DynamoDB call is cut off after [`CALL_DEADLINE`], so a stalled
//!   request cannot stall a consumer; an input that must be polled within a limit
//!   (Kafka) gives the calls between two polls a budget in all ([`polled`]).
//! - **Counters and latency** of the run ([`Summary`]).

mod backlog;
mod checkpointer;
mod clock;
mod config;
mod deadline;
mod error;
mod latency;
mod lease;
mod merged;
mod run;
mod sinks;
mod stages;
mod summary;
mod units;
mod writer;

pub use checkpointer::Saving;
pub use clock::{now_ms, unique_owner};
pub use config::{count_gap, oversized, LiveConfig, OnGap, Pacing, WriterConfig, DEFAULT_MAX_RECORD_BYTES, DEFAULT_TOMBSTONE_HORIZON, GAP_HINT};
pub use deadline::{polled, within, CALL_DEADLINE};
pub use error::Error;
pub use run::{checkpoint, invoke, run, Source};
pub use summary::Summary;
pub use toolrank_backoff::Backoff;
pub use toolrank_sink::{Pace, Wired};
pub use toolrank_state::LogHead;
pub use units::{apply_change, apply_deltas, apply_line, guard, log_engine, restore, BaseRead, LogCatchUp, Panicked};
pub use writer::SinkWriter;
