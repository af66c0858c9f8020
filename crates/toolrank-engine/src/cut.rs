//! The recommendation cut from a census of what the scores depend on. A pattern's score
//! for a given day depends only on its executions, successes and last day, and patterns
//! share those heavily (a few thousand distinct ones among a hundred thousand patterns),
//! so a census (inputs → how many patterns) describes every score exactly in a fraction
//! of their memory. Censuses of disjoint sets of patterns add up: writers that each hold
//! part of the patterns can agree on the cut over all of them, exactly, by exchanging
//! censuses instead of scores.

use crate::figures::TOP_PERCENTILE;
use crate::score::{self, RECOMMEND_PERCENTILE};
use rustc_hash::FxHashMap;
use toolrank_events::Day;

/// What a pattern's score depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreInputs {
    pub executions: u64,
    pub successes: u64,
    pub last: Day,
}

impl ScoreInputs {
    /// `pattern_score` for `today`.
    pub fn score(&self, today: Day) -> f64 {
        score::pattern_score(self.executions, self.successes, i64::from(today.0) - i64::from(self.last.0))
    }
}

/// How many patterns have each [`ScoreInputs`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScoreCensus(FxHashMap<ScoreInputs, u64>);

/// The two cuts the sinks apply, for one day.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cuts {
    /// `PERCENTILE_CONT(0.8)` of every pattern's score: at or above it, recommended.
    pub recommend: f64,
    /// The top-scoring set's percentile: at or above it, the long TTL.
    pub top: f64,
}

impl ScoreCensus {
    /// Counts one more pattern with `inputs`.
    pub fn add(&mut self, inputs: ScoreInputs) {
        *self.0.entry(inputs).or_default() += 1;
    }

    /// Adds another census (of other patterns) to this one.
    pub fn merge(&mut self, other: &ScoreCensus) {
        for (&inputs, &n) in &other.0 {
            *self.0.entry(inputs).or_default() += n;
        }
    }

    /// The census as bytes, for another writer ([`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut entries: Vec<(u64, u64, i32, u64)> = self.0.iter().map(|(i, &n)| (i.executions, i.successes, i.last.0, n)).collect();
        entries.sort_unstable();
        postcard::to_allocvec(&entries).expect("a vector serializes")
    }

    /// A census [`to_bytes`](Self::to_bytes) wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<ScoreCensus, postcard::Error> {
        let entries: Vec<(u64, u64, i32, u64)> = postcard::from_bytes(bytes)?;
        Ok(ScoreCensus(entries.into_iter().map(|(executions, successes, last, n)| (ScoreInputs { executions, successes, last: Day(last) }, n)).collect()))
    }

    /// How many patterns it counts.
    pub fn patterns(&self) -> u64 {
        self.0.values().sum()
    }

    /// The cuts for `today`, equal to `PERCENTILE_CONT` over every counted pattern's
    /// score sorted ([`score::percentile_cont`]); `None` without patterns.
    pub fn cuts(&self, today: Day) -> Option<Cuts> {
        let mut scores: Vec<(f64, u64)> = self.0.iter().map(|(inputs, &n)| (inputs.score(today), n)).collect();
        scores.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let n: u64 = scores.iter().map(|&(_, n)| n).sum();
        Some(Cuts { recommend: percentile(&scores, n, RECOMMEND_PERCENTILE)?, top: percentile(&scores, n, TOP_PERCENTILE)? })
    }
}

/// [`score::percentile_cont`] over `n` values given as sorted (value, how many) runs.
fn percentile(runs: &[(f64, u64)], n: u64, p: f64) -> Option<f64> {
    let last = n.checked_sub(1)?;
    let pos = p * last as f64;
    let (lo, hi) = (pos.floor(), pos.ceil());
    let (a, b) = (order_statistic(runs, lo as u64), order_statistic(runs, hi as u64));
    Some(if lo == hi { a } else { a + (pos - lo) * (b - a) })
}

/// The `k`-th smallest value (from 0) of the runs.
fn order_statistic(runs: &[(f64, u64)], k: u64) -> f64 {
    let mut below = 0;
    for &(value, n) in runs {
        below += n;
        if k < below {
            return value;
        }
    }
    unreachable!("k is below the number of values")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random pattern inputs, many repeated, as a history's are.
    fn patterns(seed: u64, n: usize) -> Vec<ScoreInputs> {
        let mut x = seed;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        (0..n)
            .map(|_| {
                let executions = 1 + next(6);
                ScoreInputs { executions, successes: next(executions + 1), last: Day(20_000 + next(40) as i32) }
            })
            .collect()
    }

    #[test]
    fn cuts_equal_the_percentiles_of_the_sorted_scores() {
        let today = Day(20_050);
        for (seed, n) in [(1, 0), (2, 1), (3, 2), (4, 5), (5, 97), (6, 1000), (7, 20_000)] {
            let inputs = patterns(seed, n);
            let mut census = ScoreCensus::default();
            inputs.iter().for_each(|&i| census.add(i));
            let mut sorted: Vec<f64> = inputs.iter().map(|i| i.score(today)).collect();
            sorted.sort_unstable_by(f64::total_cmp);
            let expected = score::percentile_cont(&sorted, RECOMMEND_PERCENTILE).zip(score::percentile_cont(&sorted, TOP_PERCENTILE));
            let got = census.cuts(today).map(|c| (c.recommend, c.top));
            // Bit for bit: a sink's recommended set must be the batch's.
            assert_eq!(got.map(|(a, b)| (a.to_bits(), b.to_bits())), expected.map(|(a, b)| (a.to_bits(), b.to_bits())), "seed {seed}, {n} patterns");
            assert_eq!(census.patterns(), n as u64);
        }
    }

    #[test]
    fn censuses_of_parts_add_up_to_the_census_of_the_whole() {
        let inputs = patterns(11, 5000);
        let mut whole = ScoreCensus::default();
        inputs.iter().for_each(|&i| whole.add(i));
        let mut parts = vec![ScoreCensus::default(); 3];
        for (i, &inputs) in inputs.iter().enumerate() {
            parts[i % 3].add(inputs);
        }
        let mut sum = ScoreCensus::default();
        parts.iter().for_each(|p| sum.merge(p));
        assert_eq!(sum, whole);
        assert_eq!(sum.cuts(Day(20_045)), whole.cuts(Day(20_045)));
        assert_eq!(ScoreCensus::from_bytes(&whole.to_bytes()).unwrap(), whole);
    }
}
