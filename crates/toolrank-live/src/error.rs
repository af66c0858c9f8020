//! The runtime's failures.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] toolrank_dynamodb::Error),
    /// A checkpoint that reads back but does not restore: retrying cannot mend it.
    #[error("checkpoint of {scope}: {source}; {RESET}", RESET = reset_hint(scope))]
    Snapshot { scope: String, source: toolrank_engine::StateError },
    /// A checkpoint whose stored items do not read back (a corrupt or unknown encoding).
    #[error("checkpoint of {scope}: {message}; {RESET}", RESET = reset_hint(scope))]
    Unreadable { scope: String, message: String },
}

impl Error {
    /// A checkpoint that can never be restored as it is: its unit stops (the others go
    /// on) until `toolrank checkpoint reset` deletes it.
    pub fn is_broken_checkpoint(&self) -> bool {
        matches!(self, Error::Snapshot { .. } | Error::Unreadable { .. })
    }
}

/// How to recover a unit whose checkpoint is broken.
fn reset_hint(scope: &str) -> String {
    format!("to recover, run `toolrank checkpoint reset --scope {scope}`, then a backfill (docs/operations.md, Runbooks)")
}
