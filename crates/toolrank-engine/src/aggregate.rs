//! Stage (b): aggregates per agent and per pattern that only sum contribution deltas.
//!
//! A contribution is what one (session, agent) group adds to the results. Retracting one
//! is adding it with `diff = -1`, so aggregates from separate engines (one per Kafka
//! partition or stream shard) merge by addition, and max/min dates survive retraction
//! because they are kept as day histograms.

use crate::intern::Sym;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::BTreeMap;
use toolrank_events::Day;

/// What one agent execution — the rows of one agent in one session — contributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    /// Every row succeeded.
    pub success: bool,
    /// Earliest and latest row date.
    pub first: Day,
    pub last: Day,
    /// The interned (process ids ++ tool names) sequence in execution order.
    pub pattern: Sym,
    /// Row count.
    pub rows: u32,
    /// `ToolNM` of each failed row (boxed: every session keeps one per agent).
    pub failed_tools: Box<[Sym]>,
}

/// Counts per day, so that the latest/earliest day is known after any retraction.
/// A sorted vector: most patterns have one or two distinct days, and agents at most one
/// entry per day of history, so this beats a tree on both memory and speed. One day is
/// held in place (no allocation: most patterns' histograms hold one), more on the heap;
/// it serializes as a plain sequence, as a `Vec` does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayHistogram(pub(crate) SmallVec<[(Day, i64); 1]>);

impl DayHistogram {
    fn add(&mut self, day: Day, diff: i64) {
        match self.0.binary_search_by_key(&day, |&(d, _)| d) {
            Ok(i) => {
                self.0[i].1 += diff;
                if self.0[i].1 == 0 {
                    self.0.remove(i);
                }
            }
            Err(i) => {
                // Most histograms hold a day or two: a vector's default growth to four
                // would be most of a pattern's memory.
                self.0.reserve_exact(1);
                self.0.insert(i, (day, diff));
            }
        }
    }

    pub fn max(&self) -> Option<Day> {
        self.0.last().map(|&(d, _)| d)
    }

    pub fn min(&self) -> Option<Day> {
        self.0.first().map(|&(d, _)| d)
    }
}

/// Per agent: executions for the score, rows and failures for the tool-error report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAggregate {
    pub executions: i64,
    pub successes: i64,
    pub last_days: DayHistogram,
    pub rows: i64,
    pub failed_rows: i64,
    /// Failed rows per `ToolNM`.
    pub failed_tools: BTreeMap<Sym, i64>,
    /// Rows per `ToolNM`, for the per-agent tool rankings.
    pub tools: BTreeMap<Sym, i64>,
}

impl AgentAggregate {
    /// Every figure is zero: nothing adds to the agent (in a difference of two states,
    /// its counts can cancel while its days and tools still differ).
    fn is_empty(&self) -> bool {
        self.executions == 0
            && self.successes == 0
            && self.rows == 0
            && self.failed_rows == 0
            && self.last_days.0.is_empty()
            && self.failed_tools.is_empty()
            && self.tools.is_empty()
    }
}

/// Per (user, agent, pattern sequence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternAggregate {
    pub executions: i64,
    pub successes: i64,
    pub first_days: DayHistogram,
    pub last_days: DayHistogram,
}

impl PatternAggregate {
    /// Every figure is zero (see [`AgentAggregate`]'s).
    fn is_empty(&self) -> bool {
        self.executions == 0 && self.successes == 0 && self.first_days.0.is_empty() && self.last_days.0.is_empty()
    }
}

/// Which interner a symbol belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymKind {
    String,
    Sequence,
}

/// Identifies a pattern row: user, agent and the interned sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PatternKey {
    pub user: Sym,
    pub agent: Sym,
    pub sequence: Sym,
}

/// All aggregates. Entries whose figures all reach zero are dropped, so an aggregate built
/// by any interleaving of adds and retractions equals one built from the final state, and
/// the difference of two states (what a checkpoint's delta carries) is one too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregates {
    pub agents: FxHashMap<Sym, AgentAggregate>,
    pub patterns: FxHashMap<PatternKey, PatternAggregate>,
    /// Keys touched since [`Aggregates::take_touched`], when tracking is on (sinks write
    /// only what changed).
    #[serde(skip)]
    touched: Option<Touched>,
}

/// Agents and patterns whose aggregates changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub agents: rustc_hash::FxHashSet<Sym>,
    pub patterns: rustc_hash::FxHashSet<PatternKey>,
}

/// A [`Contribution`] with its rows' tools, borrowed from wherever it is kept.
struct Execution<'a> {
    success: bool,
    first: Day,
    last: Day,
    pattern: Sym,
    rows: u32,
    failed_tools: &'a [Sym],
    tools: &'a [Sym],
}

/// Contribution deltas an engine's flush hands out ([`crate::Engine::flush_aside`])
/// instead of applying them, so that another thread applies them to its aggregates
/// ([`apply_to`](Self::apply_to)) while the engine goes on. Flat: a batch allocates
/// nothing per delta, and cleared batches are reused.
#[derive(Debug, Default)]
pub struct Contributions {
    deltas: Vec<Delta>,
    /// The failed tools and tools of every delta, each a range of this.
    syms: Vec<Sym>,
}

#[derive(Clone, Copy, Debug)]
struct Delta {
    user: Sym,
    agent: Sym,
    pattern: Sym,
    first: Day,
    last: Day,
    rows: u32,
    success: bool,
    diff: i64,
    /// `syms[failed_at..tools_at]` failed, `syms[tools_at..end]` all tools.
    failed_at: u32,
    tools_at: u32,
    end: u32,
}

impl Contributions {
    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.deltas.clear();
        self.syms.clear();
    }

    pub(crate) fn push(&mut self, user: Sym, agent: Sym, c: &Contribution, tools: &[Sym], diff: i64) {
        let failed_at = self.syms.len() as u32;
        self.syms.extend_from_slice(&c.failed_tools);
        let tools_at = self.syms.len() as u32;
        self.syms.extend_from_slice(tools);
        let (pattern, first, last, rows, success) = (c.pattern, c.first, c.last, c.rows, c.success);
        self.deltas.push(Delta { user, agent, pattern, first, last, rows, success, diff, failed_at, tools_at, end: self.syms.len() as u32 });
    }

    /// Applies the batch's deltas, in order, to `aggregates`.
    pub fn apply_to(&self, aggregates: &mut Aggregates) {
        for d in &self.deltas {
            let execution = Execution {
                success: d.success,
                first: d.first,
                last: d.last,
                pattern: d.pattern,
                rows: d.rows,
                failed_tools: &self.syms[d.failed_at as usize..d.tools_at as usize],
                tools: &self.syms[d.tools_at as usize..d.end as usize],
            };
            aggregates.add(d.user, d.agent, &execution, d.diff);
        }
    }
}

fn add(map: &mut BTreeMap<Sym, i64>, key: Sym, diff: i64) {
    let n = map.entry(key).or_insert(0);
    *n += diff;
    if *n == 0 {
        map.remove(&key);
    }
}

impl Aggregates {
    /// Starts recording which keys change.
    pub fn track(&mut self) {
        self.touched.get_or_insert_with(Touched::default);
    }

    /// The keys changed since the last call (empty when not tracking).
    pub fn take_touched(&mut self) -> Touched {
        self.touched.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Adds (`diff = 1`) or retracts (`diff = -1`) one agent execution of `user`; `tools`
    /// are the `ToolNM`s of its rows.
    pub fn apply(&mut self, user: Sym, agent: Sym, c: &Contribution, tools: &[Sym], diff: i64) {
        self.apply_where(user, agent, c, tools, diff, true);
    }

    /// [`apply`](Self::apply), leaving the pattern out unless `pattern` (a merged view of
    /// some sink shards: the user's patterns are another shard's).
    pub(crate) fn apply_where(&mut self, user: Sym, agent: Sym, c: &Contribution, tools: &[Sym], diff: i64, pattern: bool) {
        let execution = Execution { success: c.success, first: c.first, last: c.last, pattern: c.pattern, rows: c.rows, failed_tools: &c.failed_tools, tools };
        self.add_agent(agent, &execution, diff);
        if pattern {
            self.add_pattern(user, agent, &execution, diff);
        }
    }

    fn add(&mut self, user: Sym, agent: Sym, c: &Execution<'_>, diff: i64) {
        self.add_agent(agent, c, diff);
        self.add_pattern(user, agent, c, diff);
    }

    fn add_agent(&mut self, agent: Sym, c: &Execution<'_>, diff: i64) {
        let succ = diff * i64::from(c.success);
        let a = self.agents.entry(agent).or_default();
        a.executions += diff;
        a.successes += succ;
        a.last_days.add(c.last, diff);
        a.rows += diff * i64::from(c.rows);
        a.failed_rows += diff * c.failed_tools.len() as i64;
        for &t in c.failed_tools {
            add(&mut a.failed_tools, t, diff);
        }
        for &t in c.tools {
            add(&mut a.tools, t, diff);
        }
        if a.is_empty() {
            self.agents.remove(&agent);
        }
        if let Some(t) = &mut self.touched {
            t.agents.insert(agent);
        }
    }

    fn add_pattern(&mut self, user: Sym, agent: Sym, c: &Execution<'_>, diff: i64) {
        let succ = diff * i64::from(c.success);
        let key = PatternKey { user, agent, sequence: c.pattern };
        if let Some(t) = &mut self.touched {
            t.patterns.insert(key);
        }
        let p = self.patterns.entry(key).or_default();
        p.executions += diff;
        p.successes += succ;
        p.first_days.add(c.first, diff);
        p.last_days.add(c.last, diff);
        if p.is_empty() {
            self.patterns.remove(&key);
        }
    }

    /// Adds `other`, whose symbols are ours: taken over whole when there is nothing to
    /// add it to and no change to record.
    pub(crate) fn add_all(&mut self, other: Aggregates) {
        if self.agents.is_empty() && self.patterns.is_empty() && self.touched.is_none() {
            (self.agents, self.patterns) = (other.agents, other.patterns);
        } else {
            self.absorb(&other, 1, |_, sym| sym);
        }
    }

    /// Rewrites every symbol through `renumber` (the engine's names were renumbered).
    pub(crate) fn renumber(&mut self, mut renumber: impl FnMut(SymKind, Sym) -> Sym) {
        let mut string = |s| renumber(SymKind::String, s);
        let syms = |map: BTreeMap<Sym, i64>, string: &mut dyn FnMut(Sym) -> Sym| map.into_iter().map(|(t, n)| (string(t), n)).collect();
        self.agents = std::mem::take(&mut self.agents)
            .into_iter()
            .map(|(agent, mut a)| {
                a.failed_tools = syms(std::mem::take(&mut a.failed_tools), &mut string);
                a.tools = syms(std::mem::take(&mut a.tools), &mut string);
                (string(agent), a)
            })
            .collect();
        let mut key = |k: PatternKey| PatternKey {
            user: renumber(SymKind::String, k.user),
            agent: renumber(SymKind::String, k.agent),
            sequence: renumber(SymKind::Sequence, k.sequence),
        };
        self.patterns = std::mem::take(&mut self.patterns).into_iter().map(|(k, p)| (key(k), p)).collect();
        if let Some(t) = &mut self.touched {
            t.patterns = std::mem::take(&mut t.patterns).into_iter().map(&mut key).collect();
            t.agents = std::mem::take(&mut t.agents).into_iter().map(|a| renumber(SymKind::String, a)).collect();
        }
    }

    /// Adds (`sign = 1`) or subtracts (`sign = -1`) another engine's aggregates,
    /// `translate` mapping its symbols into ours.
    pub fn absorb(&mut self, other: &Aggregates, sign: i64, translate: impl FnMut(SymKind, Sym) -> Sym) {
        self.absorb_where(other, sign, translate, |_| true);
    }

    /// [`absorb`](Self::absorb), leaving out the patterns of the users (`other`'s
    /// symbols) that `keep` refuses.
    pub(crate) fn absorb_where(&mut self, other: &Aggregates, sign: i64, mut translate: impl FnMut(SymKind, Sym) -> Sym, keep: impl FnMut(Sym) -> bool) {
        for (&agent, o) in &other.agents {
            let agent = translate(SymKind::String, agent);
            let a = self.agents.entry(agent).or_default();
            a.executions += sign * o.executions;
            a.successes += sign * o.successes;
            for &(day, n) in &o.last_days.0 {
                a.last_days.add(day, sign * n);
            }
            a.rows += sign * o.rows;
            a.failed_rows += sign * o.failed_rows;
            for (&t, &n) in &o.failed_tools {
                add(&mut a.failed_tools, translate(SymKind::String, t), sign * n);
            }
            for (&t, &n) in &o.tools {
                add(&mut a.tools, translate(SymKind::String, t), sign * n);
            }
            if a.is_empty() {
                self.agents.remove(&agent);
            }
            if let Some(t) = &mut self.touched {
                t.agents.insert(agent);
            }
        }
        self.absorb_patterns(other, sign, &mut translate, keep);
    }

    /// The patterns' part of [`absorb_where`](Self::absorb_where).
    pub(crate) fn absorb_patterns(
        &mut self,
        other: &Aggregates,
        sign: i64,
        translate: &mut impl FnMut(SymKind, Sym) -> Sym,
        mut keep: impl FnMut(Sym) -> bool,
    ) {
        for (key, o) in other.patterns.iter().filter(|(k, _)| keep(k.user)) {
            let (user, agent) = (translate(SymKind::String, key.user), translate(SymKind::String, key.agent));
            let key = PatternKey { user, agent, sequence: translate(SymKind::Sequence, key.sequence) };
            let p = self.patterns.entry(key).or_default();
            p.executions += sign * o.executions;
            p.successes += sign * o.successes;
            for &(day, n) in &o.first_days.0 {
                p.first_days.add(day, sign * n);
            }
            for &(day, n) in &o.last_days.0 {
                p.last_days.add(day, sign * n);
            }
            if p.is_empty() {
                self.patterns.remove(&key);
            }
            if let Some(t) = &mut self.touched {
                t.patterns.insert(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots and deltas written before the histogram held a day in place still read,
    /// and read alike: it serializes exactly as the vector it replaced.
    #[test]
    fn a_day_histogram_serializes_as_a_vector_of_its_days() {
        for days in [vec![], vec![(Day(20_000), 3)], vec![(Day(20_000), 3), (Day(20_002), -1), (Day(20_005), 7)]] {
            let h = DayHistogram(days.as_slice().into());
            let bytes = postcard::to_allocvec(&h).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&days).unwrap());
            assert_eq!(postcard::from_bytes::<DayHistogram>(&bytes).unwrap(), h);
        }
    }
}
