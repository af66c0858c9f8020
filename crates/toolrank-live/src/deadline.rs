//! Every DynamoDB call a consumer's loop waits for is cut off, and while the loop waits,
//! the source may keep itself alive ([`KeepAlive`]).

use std::cell::RefCell;
use std::time::Duration;

/// The longest a DynamoDB call may block a consumer's loop: well inside Kafka's poll
/// interval, so that a stalled request cannot cost a consumer its partitions.
pub const CALL_DEADLINE: Duration = Duration::from_secs(40);

/// How often a waiting loop gives its [`KeepAlive`] a turn.
const TICK: Duration = Duration::from_secs(1);

/// What a source does while its loop waits on a blocking call longer than a second: a
/// Kafka consumer pauses its partitions and polls, so that several slow state-table calls
/// in a row never add up past `max.poll.interval.ms` (the group would take its partitions
/// away), then resumes them.
pub trait KeepAlive {
    /// About every second of the wait.
    fn waiting(&mut self);
    /// The wait is over (only after [`waiting`](Self::waiting)).
    fn done(&mut self);
}

thread_local! {
    static KEEP_ALIVE: RefCell<Option<Box<dyn KeepAlive>>> = const { RefCell::new(None) };
}

/// Sets (or with `None` removes) what this thread's loop does while it waits.
pub fn keep_alive(hook: Option<Box<dyn KeepAlive>>) {
    KEEP_ALIVE.with(|k| *k.borrow_mut() = hook);
}

fn turn(f: impl FnOnce(&mut dyn KeepAlive)) {
    KEEP_ALIVE.with(|k| {
        if let Some(hook) = k.borrow_mut().as_mut() {
            f(hook.as_mut());
        }
    });
}

/// Runs `future` to completion on `rt`, giving the thread's [`KeepAlive`] its turns.
pub(crate) fn block<F: std::future::Future>(rt: &tokio::runtime::Runtime, future: F) -> F::Output {
    if KEEP_ALIVE.with(|k| k.borrow().is_none()) {
        return rt.block_on(future);
    }
    let (out, waited) = rt.block_on(async {
        tokio::pin!(future);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        let mut waited = false;
        loop {
            tokio::select! {
                out = &mut future => break (out, waited),
                _ = ticks.tick() => {
                    waited = true;
                    turn(|hook| hook.waiting());
                }
            }
        }
    });
    if waited {
        turn(|hook| hook.done());
    }
    out
}

/// Runs `call` on `rt`, cut off after [`CALL_DEADLINE`].
pub fn within<T, E: Into<toolrank_dynamodb::Error>>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, toolrank_dynamodb::Error> {
    // The timer must be made inside the runtime.
    match block(rt, async { tokio::time::timeout(CALL_DEADLINE, call).await }) {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(toolrank_dynamodb::Error::Timeout(format!("{what} (after {} s)", CALL_DEADLINE.as_secs()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Count(Arc<Mutex<(u32, u32)>>);

    impl KeepAlive for Count {
        fn waiting(&mut self) {
            self.0.lock().unwrap().0 += 1;
        }
        fn done(&mut self) {
            self.0.lock().unwrap().1 += 1;
        }
    }

    #[test]
    fn a_long_wait_gives_the_hook_a_turn_each_second_then_ends_it() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let seen = Arc::new(Mutex::new((0, 0)));
        keep_alive(Some(Box::new(Count(seen.clone()))));
        assert_eq!(block(&rt, async { 7 }), 7);
        assert_eq!(*seen.lock().unwrap(), (0, 0), "a short call costs the hook nothing");
        block(&rt, async { tokio::time::sleep(Duration::from_millis(2500)).await });
        assert_eq!(*seen.lock().unwrap(), (2, 1));
        keep_alive(None);
        block(&rt, async { tokio::time::sleep(Duration::from_millis(1200)).await });
        assert_eq!(*seen.lock().unwrap(), (2, 1));
    }
}
