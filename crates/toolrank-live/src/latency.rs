//! How long records take to become visible in the sinks.

/// Milliseconds in 1 ms buckets up to a minute, the rest in the last.
struct Latencies {
    buckets: Vec<u64>,
    count: u64,
}

impl Latencies {
    const BUCKETS: usize = 60_001;

    fn new() -> Latencies {
        Latencies { buckets: vec![0; Self::BUCKETS], count: 0 }
    }

    fn record(&mut self, ms: i64) {
        self.buckets[(ms.max(0) as usize).min(Self::BUCKETS - 1)] += 1;
        self.count += 1;
    }

    fn quantile(&self, q: f64) -> Option<u64> {
        let rank = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .filter(|_| self.count > 0)
            .map(|i| i as u64)
    }
}

/// The most records whose latency is waited for (16 bytes each: 16 MiB).
const MAX_UNSEEN: usize = 1 << 20;

/// The records applied but not yet visible in the sinks, and the latencies of those that
/// became visible.
pub(crate) struct Visibility {
    /// Creation and read times (ms since the epoch) of the records not yet visible.
    unseen: Vec<(i64, i64)>,
    /// From a record's creation, and from its read by this consumer, to visible.
    latencies: Latencies,
    own_latencies: Latencies,
}

impl Visibility {
    pub(crate) fn new() -> Visibility {
        Visibility { unseen: Vec::new(), latencies: Latencies::new(), own_latencies: Latencies::new() }
    }

    /// A record created at `created` and read at `read` (ms since the epoch) waits to be
    /// visible. Past [`MAX_UNSEEN`] waiting records (the sinks are down) the latency of
    /// the rest is not measured, only counted: the list stays bounded.
    pub(crate) fn push(&mut self, created: i64, read: i64) {
        if self.unseen.len() < MAX_UNSEEN {
            self.unseen.push((created, read));
        } else {
            toolrank_metrics::counter!("toolrank_latency_unmeasured_total").increment(1);
        }
    }

    /// How many records wait to be visible.
    pub(crate) fn waiting(&self) -> usize {
        self.unseen.len()
    }

    /// Forgets the waiting records: another writer makes them visible, and their latency
    /// is not this one's to measure.
    pub(crate) fn clear(&mut self) {
        self.unseen.clear();
    }

    /// The first `n` waiting records are visible since `now` (ms since the epoch).
    pub(crate) fn visible(&mut self, n: usize, now: i64) {
        let (visible, own) = (toolrank_metrics::histogram!("toolrank_visible_latency_seconds"), toolrank_metrics::histogram!("toolrank_own_latency_seconds"));
        for (created, read) in self.unseen.drain(..n.min(self.unseen.len())) {
            self.latencies.record(now - created);
            self.own_latencies.record(now - read);
            visible.record((now - created).max(0) as f64 / 1000.0);
            own.record((now - read).max(0) as f64 / 1000.0);
        }
    }

    /// The `q` quantile of the latency from creation, and from the read.
    pub(crate) fn latency(&self, q: f64) -> Option<u64> {
        self.latencies.quantile(q)
    }

    pub(crate) fn own_latency(&self, q: f64) -> Option<u64> {
        self.own_latencies.quantile(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_waiting_to_be_visible_are_bounded() {
        let mut v = Visibility::new();
        for i in 0..MAX_UNSEEN + 10 {
            v.push(i as i64, i as i64);
        }
        assert_eq!(v.waiting(), MAX_UNSEEN);
        v.visible(v.waiting(), MAX_UNSEEN as i64 + 5);
        assert_eq!((v.waiting(), v.latency(0.0)), (0, Some(6)));
    }
}
