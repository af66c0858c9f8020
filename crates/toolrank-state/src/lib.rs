//! The pipeline's own state table: checkpoints as delta logs, leases, registered sets
//! and heartbeats (see [`CheckpointStore`] and [`Lease`]). Nothing here touches the
//! application's table; `toolrank-dynamodb` has the client, the errors and the
//! AgentTable helpers this builds on.

mod checkpoint;
mod lz4_prefix;

pub use checkpoint::{Checkpoint, CheckpointStore, Lease, Log, LogHead, Taken, COMPACT_MIN_BYTES, DELTAS_PER_APPEND, DELTA_BYTES};
pub use toolrank_dynamodb::{Error, TableStatusReport};

/// Creates the pipeline's state table unless it exists: `PK`/`SK` strings, on-demand,
/// no stream (checkpoints and leases must not come back as events). Idempotent.
pub async fn create_state_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<TableStatusReport, Error> {
    toolrank_dynamodb::create_keyed_table(client, table).await
}
