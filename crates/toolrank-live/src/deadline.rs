//! Every DynamoDB call a consumer's loop waits for is cut off.

use std::time::Duration;

/// The longest a DynamoDB call may block a consumer's loop: well inside Kafka's poll
/// interval, so that a stalled request cannot cost a consumer its partitions.
pub const CALL_DEADLINE: Duration = Duration::from_secs(40);

/// Runs `call` on `rt`, cut off after [`CALL_DEADLINE`].
pub fn within<T, E: Into<toolrank_dynamodb::Error>>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, toolrank_dynamodb::Error> {
    // The timer must be made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await }) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("{what} (after {} s)", CALL_DEADLINE.as_secs()))),
    }
}
