//! Capped exponential backoff with full jitter: retries of many processes after one
//! outage spread out instead of arriving together.

use std::time::Duration;

/// The delays of one retry loop: each a random duration between zero and the base doubled
/// per attempt, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        // Seeded per process and loop, so two processes retrying together draw apart.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let state = nanos ^ (u64::from(std::process::id()) << 32) ^ (&nanos as *const u64 as u64);
        Backoff { base, cap, attempt: 0, state: state | 1 }
    }

    /// Starts over from the base delay (the call succeeded).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay to wait before retrying.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ceiling.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_under_a_doubling_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << n.min(5))).min(Duration::from_secs(2));
            assert!(*d <= ceiling, "attempt {n}: {d:?} over {ceiling:?}");
        }
        // Jitter: the capped delays are not all alike, and they use the range.
        let capped = &delays[10..];
        assert!(capped.iter().any(|d| *d < Duration::from_millis(1000)) && capped.iter().any(|d| *d > Duration::from_millis(1000)), "{capped:?}");
    }

    #[test]
    fn a_reset_starts_from_the_base_again() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
