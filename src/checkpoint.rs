//! `toolrank checkpoint`: the live consumers' checkpoints in the state table.

use anyhow::Result;
use std::process::ExitCode;

/// The checkpoints the live consumers keep in the state table.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Delete one unit's checkpoint (its state, input position and delta log): the
    /// recovery for a checkpoint that does not decode ("checkpoint of SCOPE: ..."). The
    /// unit's next owner starts it from nothing at the input's oldest record; then
    /// `toolrank backfill` fills in what the input no longer holds (docs/operations.md,
    /// Runbooks, "A checkpoint that does not decode").
    Reset(ResetArgs),
}

#[derive(clap::Args)]
pub struct ResetArgs {
    /// The unit, as errors and logs name it: `kafka/GROUP/TOPIC/PARTITION`,
    /// `streams/APPLICATION/STREAM/TREE`, `lambda/APPLICATION/bucket/NNNNN`.
    #[arg(long)]
    scope: String,
    /// The pipeline's state table.
    #[arg(long, env = "TOOLRANK_STATE_TABLE", default_value = "toolrank-state")]
    state_table: String,
}

pub fn run(command: Command) -> Result<ExitCode> {
    let Command::Reset(args) = command;
    let rt = tokio::runtime::Runtime::new()?;
    let deleted = rt.block_on(async {
        let store = toolrank_state::CheckpointStore::new(toolrank_dynamodb::client().await, args.state_table.clone());
        store.reset(&args.scope).await
    })?;
    if deleted == 0 {
        note!("toolrank: {} holds nothing under {}: check the scope (it is named in the consumer's error)", args.state_table, args.scope);
        return Ok(ExitCode::FAILURE);
    }
    out!("deleted the checkpoint of {} ({deleted} items) from {}", args.scope, args.state_table);
    Ok(ExitCode::SUCCESS)
}
