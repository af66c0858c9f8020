//! The runtime's failures.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] toolrank_dynamodb::Error),
    #[error("checkpoint of {scope}: {source}")]
    Snapshot { scope: String, source: toolrank_engine::StateError },
}
