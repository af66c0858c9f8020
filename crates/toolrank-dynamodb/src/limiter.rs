//! A capacity budget per second, shared by concurrent requests: a backfill's reads
//! (`--max-rcu`), the sink's writes (`--dynamodb-max-wcu`).

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// Keeps the capacity units spent by all callers under a budget per second: each request
/// reserves the time its units take at that rate, and waits for its turn.
pub struct Limiter {
    per_second: Option<f64>,
    next: Mutex<Instant>,
}

impl Limiter {
    /// At most `per_second` units a second; `None` or 0: no limit.
    pub fn new(per_second: Option<f64>) -> Limiter {
        Limiter { per_second: per_second.filter(|&r| r > 0.0), next: Mutex::new(Instant::now()) }
    }

    /// Accounts for `units` spent (or about to be), waiting if the budget is ahead.
    pub async fn spend(&self, units: f64) {
        let Some(rate) = self.per_second else { return };
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            // A budget so small that the step overflows a Duration waits a year at most.
            let step = Duration::try_from_secs_f64(units / rate).map_or(LONGEST, |d| d.min(LONGEST));
            *next = start + step;
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limiter_spaces_requests_by_their_units() {
        let limiter = Limiter::new(Some(100.0));
        let t0 = tokio::time::Instant::now();
        for _ in 0..5 {
            limiter.spend(50.0).await;
        }
        // 250 units at 100/s: the fifth request waits until 2 s.
        assert!(t0.elapsed() >= Duration::from_millis(1990), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn no_budget_waits_for_nothing() {
        for limiter in [Limiter::new(None), Limiter::new(Some(0.0))] {
            let t0 = tokio::time::Instant::now();
            limiter.spend(1e9).await;
            limiter.spend(1e9).await;
            assert_eq!(t0.elapsed(), Duration::ZERO);
        }
    }
}
