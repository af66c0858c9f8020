//! The seed's scoring formulas (SPEC §3), and the time-invariant rank keys that order
//! agents and patterns the same way at every later date.

/// Decay rate of agent scores per day.
pub const AGENT_DECAY: f64 = 0.1;
/// Decay rate of pattern scores per day.
pub const PATTERN_DECAY: f64 = 0.05;
/// The recommendation cut: patterns at or above this percentile of all pattern scores.
pub const RECOMMEND_PERCENTILE: f64 = 0.8;

/// `success / total`.
pub fn rate(successes: u64, total: u64) -> f64 {
    successes as f64 / total as f64
}

/// `exp(-k × days)`.
pub fn decay(k: f64, days: i64) -> f64 {
    (-k * days as f64).exp()
}

/// `calculated_score = total × decay × rate²`, in the seed SQL's order of operations.
pub fn agent_score(total: u64, successes: u64, days: i64) -> f64 {
    total as f64 * decay(AGENT_DECAY, days) * rate(successes, total).powi(2)
}

/// `pattern_score = count × rate² × exp(−0.05 × days)`.
pub fn pattern_score(count: u64, successes: u64, days: i64) -> f64 {
    count as f64 * rate(successes, count).powi(2) * decay(PATTERN_DECAY, days)
}

/// `ln(score) + k × day(today)`: `ln N + 2 ln(rate) + k × day(last)`. It does not depend
/// on today, so sorting by it gives the order of the scores at any date. Zero successes
/// give `-inf` (they sort last).
pub fn rank_key(k: f64, total: u64, successes: u64, last_day: i32) -> f64 {
    if successes == 0 {
        return f64::NEG_INFINITY;
    }
    (total as f64).ln() + 2.0 * rate(successes, total).ln() + k * f64::from(last_day)
}

/// PostgreSQL/Redshift `PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY v)` over sorted values:
/// linear interpolation between the two order statistics around `p × (n − 1)`.
pub fn percentile_cont(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let pos = p * last as f64;
    let lo = pos.floor();
    let hi = pos.ceil();
    let (a, b) = (sorted[lo as usize], sorted[hi as usize]);
    Some(if lo == hi { a } else { a + (pos - lo) * (b - a) })
}

/// [`percentile_cont`] of values in any order, in linear time: the two order statistics
/// are selected, not sorted for (the live sinks take it over every pattern at each write).
/// Reorders `values`.
pub fn percentile_cont_unsorted(values: &mut [f64], p: f64) -> Option<f64> {
    let last = values.len().checked_sub(1)?;
    let pos = p * last as f64;
    let (lo, hi) = (pos.floor(), pos.ceil());
    let (_, &mut a, above) = values.select_nth_unstable_by(lo as usize, f64::total_cmp);
    if lo == hi {
        return Some(a);
    }
    // The next order statistic: the least of those at or above `a`.
    let b = above.iter().copied().min_by(f64::total_cmp).unwrap_or(a);
    Some(a + (pos - lo) * (b - a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_without_sorting_agrees_with_sorted() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in [1usize, 2, 3, 4, 5, 10, 97, 1000] {
            let mut values: Vec<f64> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Ties too: a quarter of the values repeat one.
                    if i % 4 == 0 {
                        0.5
                    } else {
                        (x % 10_000) as f64 / 100.0
                    }
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable_by(f64::total_cmp);
            for p in [0.0, 0.05, 0.5, 0.8, 0.95, 1.0] {
                assert_eq!(percentile_cont_unsorted(&mut values, p), percentile_cont(&sorted, p), "n {n}, p {p}");
            }
        }
        assert_eq!(percentile_cont_unsorted(&mut [], 0.8), None);
    }

    #[test]
    fn seed_scores() {
        assert!((agent_score(2, 1, 30) - 0.024893534183931972).abs() < 1e-15);
        assert!((agent_score(1, 1, 30) - 0.049787068367863944).abs() < 1e-15);
        assert_eq!(pattern_score(1, 0, 30), 0.0);
    }

    #[test]
    fn rank_keys_order_like_scores_at_every_date() {
        let agents = [(2u64, 1u64, 100i32), (1, 1, 100), (10, 9, 90), (50, 20, 70), (3, 3, 99), (4, 0, 100)];
        for today in 100..400 {
            let mut by_score: Vec<_> = (0..agents.len()).collect();
            let mut by_key = by_score.clone();
            let s = |i: &usize| {
                let (n, k, d) = agents[*i];
                agent_score(n, k, i64::from(today - d))
            };
            let r = |i: &usize| {
                let (n, k, d) = agents[*i];
                rank_key(AGENT_DECAY, n, k, d)
            };
            by_score.sort_by(|a, b| s(b).total_cmp(&s(a)));
            by_key.sort_by(|a, b| r(b).total_cmp(&r(a)));
            if (today - 100) < 300 && s(&by_score[4]) > 0.0 {
                assert_eq!(by_score, by_key, "today {today}");
            }
        }
    }

    #[test]
    fn percentile_matches_postgres() {
        assert_eq!(percentile_cont(&[], 0.8), None);
        assert_eq!(percentile_cont(&[5.0], 0.8), Some(5.0));
        let v = [0.0, 0.22, 0.22];
        assert_eq!(percentile_cont(&v, 0.8), Some(0.22));
        // SELECT percentile_cont(0.8) WITHIN GROUP (ORDER BY x) FROM (VALUES (1),(2),(3),(4)) t(x) = 3.4
        assert!((percentile_cont(&[1.0, 2.0, 3.0, 4.0], 0.8).unwrap() - 3.4).abs() < 1e-12);
    }
}
