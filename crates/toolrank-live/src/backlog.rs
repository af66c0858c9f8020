//! Whether a backlog is being read, and how it stretches work whose result would be
//! stale anyway.

use std::time::Duration;

/// How far behind the records applied are (`behind_ms`) if a backlog is being read: one
/// was applied within the last second, and the input has not run dry for a second.
pub(crate) fn reading_behind(since_applied: Duration, since_drained: Duration, behind_ms: i64) -> Option<Duration> {
    let reading = since_applied < Duration::from_secs(1) && since_drained >= Duration::from_secs(1);
    reading.then(|| Duration::from_millis(behind_ms.max(0) as u64))
}

/// `interval`, or during a backlog `behind` records, as long as that, up to `max`.
pub(crate) fn stretch(interval: Duration, max: Duration, backlog: Option<Duration>) -> Duration {
    match backlog {
        Some(behind) => interval.max(behind.min(max)),
        None => interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn only_a_backlog_being_read_counts_as_behind() {
        let s = Duration::from_secs;
        assert_eq!(reading_behind(s(0), s(5), 20_000), Some(s(20)));
        // Nothing applied for a second: not reading.
        assert_eq!(reading_behind(s(2), s(5), 20_000), None);
        // The input ran dry within the second: the records are as recent as it delivers them.
        assert_eq!(reading_behind(s(0), Duration::from_millis(500), 20_000), None);
        // A clock ahead of the records' creation time is no lateness.
        assert_eq!(reading_behind(s(0), s(5), -3), Some(s(0)));
    }

    #[test]
    fn a_backlog_stretches_an_interval_by_its_lateness_up_to_the_maximum() {
        let s = Duration::from_secs;
        assert_eq!(stretch(s(5), s(60), None), s(5));
        assert_eq!(stretch(s(5), s(60), Some(s(2))), s(5));
        assert_eq!(stretch(s(5), s(60), Some(s(20))), s(20));
        assert_eq!(stretch(s(5), s(60), Some(s(600))), s(60));
        // A maximum at or below the interval stretches nothing.
        assert_eq!(stretch(s(5), s(0), Some(s(600))), s(5));
    }
}
