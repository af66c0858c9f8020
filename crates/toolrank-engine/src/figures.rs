//! The figures behind the report rows: what a sink stores so that the seed's tables can
//! be rebuilt from it for any `today` (scores decay, figures do not).

use crate::cut::{Cuts, ScoreCensus, ScoreInputs};
use crate::score::{self, AGENT_DECAY, PATTERN_DECAY};
use crate::{shard_of, Engine, PatternAggregate, PatternKey, Sym};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use toolrank_events::Day;

/// One agent in the catalog, with or without executions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFigures {
    pub agent_id: String,
    pub domain_id: String,
    pub agent_name: Option<String>,
    /// Agent executions and the successful ones.
    pub executions: u64,
    pub successes: u64,
    /// Latest execution date; `None` without executions.
    pub last: Option<Day>,
    /// Staging rows and failed rows.
    pub rows: u64,
    pub failed_rows: u64,
    /// Distinct `ToolNM`s of failed rows, sorted.
    pub failed_tools: Vec<String>,
    /// Rows per `ToolNM`, sorted by name.
    pub tools: Vec<ToolFigures>,
}

/// One tool of an agent, by `ToolNM`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolFigures {
    pub tool_nm: String,
    pub rows: u64,
    pub failed: u64,
}

/// One `user_process_patterns` group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PatternFigures {
    pub user_id: String,
    pub process_pattern: String,
    pub agent_id: String,
    pub tool_sequence: String,
    pub executions: u64,
    pub successes: u64,
    pub first: Day,
    pub last: Day,
}

impl AgentFigures {
    /// The time-invariant rank key (SPEC §3); `-inf` without successes.
    pub fn rank_key(&self) -> f64 {
        match self.last {
            Some(last) => score::rank_key(AGENT_DECAY, self.executions, self.successes, last.0),
            None => f64::NEG_INFINITY,
        }
    }
}

impl ToolFigures {
    /// Ranks an agent's tools: rows × success rate², the agent score without decay.
    pub fn score(&self) -> f64 {
        self.rows as f64 * score::rate(self.rows - self.failed, self.rows).powi(2)
    }
}

impl PatternFigures {
    pub fn rank_key(&self) -> f64 {
        score::rank_key(PATTERN_DECAY, self.executions, self.successes, self.last.0)
    }

    /// `pattern_score` for `today`.
    pub fn score(&self, today: Day) -> f64 {
        score::pattern_score(self.executions, self.successes, i64::from(today.0) - i64::from(self.last.0))
    }

    /// A stable identity: `user`, pattern, agent and tools joined by `|`.
    pub fn id(&self) -> String {
        pattern_id(&self.user_id, &self.process_pattern, &self.agent_id, &self.tool_sequence)
    }
}

/// A pattern's figures that borrow the engine's names, for a sink that encodes them
/// straight into its request ([`PatternFigures`] owns four strings).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatternView<'e> {
    pub user_id: &'e str,
    pub agent_id: &'e str,
    /// The pattern sequence: [`Engine::sequence_names`] gives `process_pattern` and
    /// `tool_sequence` (many users share one).
    pub sequence: Sym,
    pub executions: u64,
    pub successes: u64,
    pub first: Day,
    pub last: Day,
}

impl PatternView<'_> {
    /// [`PatternFigures::rank_key`].
    pub fn rank_key(&self) -> f64 {
        score::rank_key(PATTERN_DECAY, self.executions, self.successes, self.last.0)
    }

    /// [`PatternFigures::score`].
    pub fn score(&self, today: Day) -> f64 {
        score::pattern_score(self.executions, self.successes, i64::from(today.0) - i64::from(self.last.0))
    }
}

fn pattern_id(user: &str, process_pattern: &str, agent: &str, tool_sequence: &str) -> String {
    format!("{user}|{process_pattern}|{agent}|{tool_sequence}")
}

/// Patterns at or above the recommendation cut, each with whether it is in the
/// top-scoring set that the seed's TTL policy keeps longer.
#[derive(Clone, Debug, Default)]
pub struct Recommended(FxHashMap<PatternKey, bool>);

impl Recommended {
    /// `Some(top)` for a recommended pattern, `None` for any other.
    pub fn get(&self, k: &PatternKey) -> Option<bool> {
        self.0.get(k).copied()
    }

    pub fn contains(&self, k: &PatternKey) -> bool {
        self.0.contains_key(k)
    }

    /// The recommended patterns with their top-scoring flags, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (PatternKey, bool)> + '_ {
        self.0.iter().map(|(&k, &top)| (k, top))
    }
}

/// A view's pattern scores for one day, by sink shard, and the cuts they are recommended
/// at ([`Engine::scores_by_shard`]).
#[derive(Debug, Default)]
pub struct ShardScores {
    parts: Vec<Vec<(PatternKey, f64)>>,
    /// `None`: there is no pattern anywhere.
    cuts: Option<Cuts>,
}

impl ShardScores {
    /// The recommended patterns of `shard`, with whether each is in the top-scoring set.
    pub fn recommended(&self, shard: u32) -> Recommended {
        let (Some(cuts), Some(part)) = (self.cuts, self.parts.get(shard as usize)) else {
            return Recommended::default();
        };
        // One pass, one map: a sink plans from this at every round.
        Recommended(part.iter().filter(|&&(_, s)| s >= cuts.recommend).map(|&(k, s)| (k, s >= cuts.top)).collect())
    }
}

/// The top-scoring set: patterns at or above this percentile get the long TTL.
pub const TOP_PERCENTILE: f64 = 0.95;

impl Engine {
    /// The identity of a pattern key, visible or not (to remove what a sink holds).
    pub fn pattern_id(&self, key: PatternKey) -> String {
        let (procs, tools) = self.sequence_names(key.sequence);
        pattern_id(self.strings.get(key.user), &procs, self.strings.get(key.agent), &tools)
    }

    /// A pattern sequence as `process_pattern` and `tool_sequence` (names joined by `->`).
    pub fn sequence_names(&self, sequence: Sym) -> (String, String) {
        let seq = self.sequences.get(sequence);
        let (procs, tools) = seq.split_at(seq.len() / 2);
        let join = |ids: &[Sym]| ids.iter().map(|&s| self.strings.get(s)).collect::<Vec<_>>().join("->");
        (join(procs), join(tools))
    }

    /// The recommended patterns for `today`: `pattern_score ≥ PERCENTILE_CONT(0.8)` over all
    /// visible patterns, as in the report, the cuts taken from their [`ScoreCensus`].
    pub fn recommended(&self, today: Day) -> Recommended {
        self.scores_by_shard(today, 1, None).recommended(0)
    }

    /// Every visible pattern's score for `today`, by the sink shard of its user among
    /// `count`, to be recommended at `cuts` over every shard's patterns (`None`: this view
    /// holds them all, and its census gives the cuts): one pass over the view for every
    /// shard a writer holds, whose sinks each pick their recommended set from their part.
    pub fn scores_by_shard(&self, today: Day, count: u32, cuts: Option<Cuts>) -> ShardScores {
        let mut census = cuts.is_none().then(ScoreCensus::default);
        let mut parts = vec![Vec::new(); count.max(1) as usize];
        for (k, inputs) in self.score_inputs() {
            if let Some(census) = &mut census {
                census.add(inputs);
            }
            let shard = if count > 1 { shard_of(self.strings.get(k.user), count) as usize } else { 0 };
            parts[shard].push((k, inputs.score(today)));
        }
        ShardScores { parts, cuts: cuts.or_else(|| census.and_then(|c| c.cuts(today))) }
    }

    /// The census of the visible patterns' score inputs: all the cuts depend on.
    pub fn census(&self) -> ScoreCensus {
        let mut census = ScoreCensus::default();
        self.score_inputs().for_each(|(_, inputs)| census.add(inputs));
        census
    }

    /// [`census`](Self::census) of each of `count` sink shards' patterns, in one pass.
    pub fn census_by_shard(&self, count: u32) -> Vec<ScoreCensus> {
        let mut censuses = vec![ScoreCensus::default(); count.max(1) as usize];
        self.score_inputs().for_each(|(k, inputs)| censuses[shard_of(self.strings.get(k.user), count) as usize].add(inputs));
        censuses
    }

    /// Every visible pattern with what its score depends on.
    fn score_inputs(&self) -> impl Iterator<Item = (PatternKey, ScoreInputs)> + '_ {
        self.aggregates
            .patterns
            .iter()
            .filter(|(k, _)| self.agent_meta(k.agent).is_some())
            .filter_map(|(&k, agg)| Some((k, ScoreInputs { executions: agg.executions as u64, successes: agg.successes as u64, last: agg.last_days.max()? })))
    }

    /// An agent's figures, `None` unless it has a current Agent item.
    pub fn agent_figures(&self, agent: Sym) -> Option<AgentFigures> {
        let meta = self.agent_meta(agent)?;
        let mut f = AgentFigures {
            agent_id: self.strings.get(agent).to_owned(),
            domain_id: self.strings.get(meta.domain).to_owned(),
            agent_name: meta.name.as_deref().map(str::to_owned),
            executions: 0,
            successes: 0,
            last: None,
            rows: 0,
            failed_rows: 0,
            failed_tools: Vec::new(),
            tools: Vec::new(),
        };
        if let Some(agg) = self.aggregates.agents.get(&agent) {
            f.executions = agg.executions as u64;
            f.successes = agg.successes as u64;
            f.last = agg.last_days.max();
            f.rows = agg.rows as u64;
            f.failed_rows = agg.failed_rows as u64;
            f.failed_tools = agg.failed_tools.keys().map(|&t| self.strings.get(t).to_owned()).collect();
            f.failed_tools.sort_unstable();
            f.tools = agg
                .tools
                .iter()
                .map(|(&t, &rows)| ToolFigures {
                    tool_nm: self.strings.get(t).to_owned(),
                    rows: rows as u64,
                    failed: agg.failed_tools.get(&t).copied().unwrap_or(0) as u64,
                })
                .collect();
            f.tools.sort_unstable_by(|a, b| a.tool_nm.cmp(&b.tool_nm));
        }
        Some(f)
    }

    /// A pattern's figures, `None` unless it has executions and its agent a current Agent item.
    pub fn pattern_figures(&self, key: PatternKey) -> Option<PatternFigures> {
        let v = self.pattern_view(key)?;
        let (process_pattern, tool_sequence) = self.sequence_names(v.sequence);
        Some(PatternFigures {
            user_id: v.user_id.to_owned(),
            process_pattern,
            agent_id: v.agent_id.to_owned(),
            tool_sequence,
            executions: v.executions,
            successes: v.successes,
            first: v.first,
            last: v.last,
        })
    }

    /// [`pattern_figures`](Self::pattern_figures) borrowing the engine's names.
    pub fn pattern_view(&self, key: PatternKey) -> Option<PatternView<'_>> {
        self.view_of(key, self.aggregates.patterns.get(&key)?)
    }

    /// The view of every pattern [`pattern_view`](Self::pattern_view) gives one of, in no
    /// order: one pass over the aggregates, no lookup per pattern.
    pub fn pattern_views(&self) -> impl Iterator<Item = PatternView<'_>> + '_ {
        self.aggregates.patterns.iter().filter_map(|(&k, agg)| self.view_of(k, agg))
    }

    fn view_of(&self, key: PatternKey, agg: &PatternAggregate) -> Option<PatternView<'_>> {
        self.agent_meta(key.agent)?;
        Some(PatternView {
            user_id: self.strings.get(key.user),
            agent_id: self.strings.get(key.agent),
            sequence: key.sequence,
            executions: agg.executions as u64,
            successes: agg.successes as u64,
            first: agg.first_days.min()?,
            last: agg.last_days.max()?,
        })
    }
}
