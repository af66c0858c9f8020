//! Every DynamoDB call a consumer's loop waits for is cut off.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The longest a DynamoDB call may block a consumer's loop: well inside Kafka's poll
/// interval, so that a stalled request cannot cost a consumer its partitions.
pub const CALL_DEADLINE: Duration = Duration::from_secs(40);

thread_local! {
    /// When the calling thread must poll its input again ([`polled`]).
    static POLL_DUE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Notes that the calling thread just polled an input that drops a reader who does not
/// poll again within a limit (Kafka's `max.poll.interval.ms`), and gives the calls until
/// the next poll `budget` in all: each call through [`within`] on this thread is cut off
/// when the budget is spent, so that slow calls in a row never add up past the limit
/// (they fail as timeouts and are retried after the next poll). `None`: no budget (the
/// loop no longer polls, e.g. while it stops).
pub fn polled(budget: Option<Duration>) {
    POLL_DUE.with(|due| due.set(budget.map(|b| Instant::now() + b)));
}

/// How long the next call may take: [`CALL_DEADLINE`], or what is left of the budget.
fn cut_off() -> Duration {
    POLL_DUE.with(Cell::get).map_or(CALL_DEADLINE, |due| due.saturating_duration_since(Instant::now()).min(CALL_DEADLINE))
}

/// Runs `call` on `rt`, cut off after [`CALL_DEADLINE`] or when the poll budget is spent.
pub fn within<T, E: Into<toolrank_dynamodb::Error>>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, toolrank_dynamodb::Error> {
    let limit = cut_off();
    if limit.is_zero() {
        return Err(toolrank_dynamodb::Error::Timeout(format!("{what} (not started: the input must be polled first)")));
    }
    // The timer must be made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(limit, call).await }) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("{what} (after {:.1} s)", limit.as_secs_f64()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_share_the_budget_until_the_next_poll() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), toolrank_dynamodb::Error>(())
        };
        polled(Some(Duration::from_millis(200)));
        let started = Instant::now();
        assert!(matches!(within(&rt, "a slow call", slow()), Err(toolrank_dynamodb::Error::Timeout(_))));
        let spent = started.elapsed();
        assert!(spent >= Duration::from_millis(150), "{spent:?}");
        // The budget is spent: the next call does not start.
        let Err(toolrank_dynamodb::Error::Timeout(why)) = within(&rt, "another call", slow()) else { panic!("a timeout") };
        assert!(why.contains("not started"), "{why}");
        // A poll gives a new budget; without one, calls run to their own deadline.
        polled(Some(Duration::from_secs(5)));
        assert!(within(&rt, "a quick call", async { Ok::<u8, toolrank_dynamodb::Error>(7) }).is_ok_and(|v| v == 7));
        polled(None);
        assert_eq!(cut_off(), CALL_DEADLINE);
    }
}
