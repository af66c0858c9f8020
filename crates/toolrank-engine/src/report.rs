//! The seed's output tables, built from the aggregates at read time: the catalog join,
//! the scores for a given `today`, and the 80th-percentile recommendation cut.

use crate::score::{self, RECOMMEND_PERCENTILE};
use crate::{AgentFigures, Engine, PatternFigures, Sym};
use rustc_hash::FxHashMap;
use serde::{Serialize, Serializer};
use std::cmp::Ordering;
use toolrank_events::{Day, Timestamp};

/// One row of `agent_score_summary`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentScore {
    #[serde(rename = "domainid")]
    pub domain_id: String,
    #[serde(rename = "agentid")]
    pub agent_id: String,
    #[serde(rename = "agentnm")]
    pub agent_name: Option<String>,
    pub total_executions: u64,
    pub success_count: u64,
    pub failure_count: u64,
    pub success_rate: f64,
    #[serde(serialize_with = "day")]
    pub last_execution_date: Day,
    pub days_since_last_exec: i64,
    pub time_decay_factor: f64,
    pub calculated_score: f64,
}

/// One row of `user_process_patterns`, owning its names or (`PatternRow<&str>`)
/// borrowing them from the engine: a report of many patterns then allocates no string.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PatternRow<S = String> {
    #[serde(rename = "userid")]
    pub user_id: S,
    pub process_pattern: S,
    pub agent_sequence: S,
    pub tool_sequence: S,
    pub execution_count: u64,
    pub success_count: u64,
    #[serde(serialize_with = "day")]
    pub first_used_date: Day,
    #[serde(serialize_with = "day")]
    pub last_used_date: Day,
    pub pattern_score: f64,
    pub is_recommended: bool,
}

/// One row of the agent tool-error report (agents with at least one failed row).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolErrors {
    #[serde(rename = "agentid")]
    pub agent_id: String,
    pub agent_name: Option<String>,
    /// Staging rows of the agent.
    pub total_executions: u64,
    /// Failed staging rows.
    pub total_errors: u64,
    pub error_rate: f64,
    /// Distinct `ToolNM`s of failed rows, sorted, joined by `, `.
    pub failed_tools: String,
}

/// One row of `agent_tool_analysis_staging`: a tool execution whose agent is known.
/// Borrows from the engine: the staging table can have millions of rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StagingRow<'a> {
    #[serde(rename = "userid")]
    pub user_id: &'a str,
    #[serde(rename = "sessionid")]
    pub session_id: &'a str,
    #[serde(rename = "processid")]
    pub process_id: &'a str,
    #[serde(rename = "domainid")]
    pub domain_id: &'a str,
    #[serde(rename = "agentid")]
    pub agent_id: &'a str,
    #[serde(rename = "toolid")]
    pub tool_id: &'a str,
    #[serde(rename = "toolnm")]
    pub tool_nm: &'a str,
    #[serde(serialize_with = "day")]
    pub execution_date: Day,
    #[serde(serialize_with = "datetime")]
    pub execution_datetime: Timestamp,
    pub success_flag: bool,
}

/// The seed's tables for one `today`, each in score order; `Report<&str>` borrows the
/// pattern rows' names ([`Engine::borrowed_report`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report<S = String> {
    pub agents: Vec<AgentScore>,
    pub patterns: Vec<PatternRow<S>>,
    pub tool_errors: Vec<ToolErrors>,
}

/// The `process_pattern` and `tool_sequence` of every pattern sequence the aggregates
/// hold, joined once: many users share a sequence.
pub struct SequenceNames(FxHashMap<Sym, (String, String)>);

fn day<S: Serializer>(d: &Day, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(&d.iso_bytes()).expect("ASCII"))
}

fn datetime<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(&t.datetime_bytes()).expect("ASCII"))
}

fn desc(a: f64, b: f64) -> Ordering {
    b.total_cmp(&a)
}

pub(crate) fn sequence_names(engine: &Engine) -> SequenceNames {
    let mut names = FxHashMap::default();
    for k in engine.aggregates.patterns.keys() {
        names.entry(k.sequence).or_insert_with(|| engine.sequence_names(k.sequence));
    }
    SequenceNames(names)
}

pub(crate) fn build<'e>(engine: &'e Engine, names: &'e SequenceNames, today: Day) -> Report<&'e str> {
    let agents = engine.aggregates.agents.keys().filter_map(|&a| engine.agent_figures(a)).collect();
    let (agents, tool_errors) = agent_tables(agents, today);
    let patterns = engine
        .pattern_views()
        .map(|v| {
            let (process_pattern, tool_sequence) = &names.0[&v.sequence];
            PatternRow {
                user_id: v.user_id,
                process_pattern: process_pattern.as_str(),
                agent_sequence: v.agent_id,
                tool_sequence: tool_sequence.as_str(),
                execution_count: v.executions,
                success_count: v.successes,
                first_used_date: v.first,
                last_used_date: v.last,
                pattern_score: v.score(today),
                is_recommended: false,
            }
        })
        .collect();
    Report { agents, patterns: ranked(patterns), tool_errors }
}

/// Marks the recommended patterns and puts them in the report's order.
fn ranked<S: Ord>(mut patterns: Vec<PatternRow<S>>) -> Vec<PatternRow<S>> {
    if let Some(cut) = recommendation_cut(patterns.iter().map(|p| p.pattern_score).collect()) {
        for p in &mut patterns {
            p.is_recommended = p.pattern_score >= cut;
        }
    }
    patterns.sort_unstable_by(|a, b| {
        desc(a.pattern_score, b.pattern_score)
            .then_with(|| a.user_id.cmp(&b.user_id))
            .then_with(|| a.process_pattern.cmp(&b.process_pattern))
            .then_with(|| a.agent_sequence.cmp(&b.agent_sequence))
            .then_with(|| a.tool_sequence.cmp(&b.tool_sequence))
    });
    patterns
}

impl Report<&str> {
    /// The same report owning its names.
    pub fn into_owned(self) -> Report {
        let patterns = self
            .patterns
            .into_iter()
            .map(|p| PatternRow {
                user_id: p.user_id.to_owned(),
                process_pattern: p.process_pattern.to_owned(),
                agent_sequence: p.agent_sequence.to_owned(),
                tool_sequence: p.tool_sequence.to_owned(),
                execution_count: p.execution_count,
                success_count: p.success_count,
                first_used_date: p.first_used_date,
                last_used_date: p.last_used_date,
                pattern_score: p.pattern_score,
                is_recommended: p.is_recommended,
            })
            .collect();
        Report { agents: self.agents, patterns, tool_errors: self.tool_errors }
    }
}

impl Report {
    /// The seed's tables for `today` from figures (of an engine, or read back from a sink):
    /// scores, the 80th-percentile cut over all patterns, and the row order.
    pub fn from_figures(agents: Vec<AgentFigures>, patterns: Vec<PatternFigures>, today: Day) -> Report {
        let (agents, tool_errors) = agent_tables(agents, today);
        let patterns = patterns
            .into_iter()
            .map(|f| PatternRow {
                pattern_score: f.score(today),
                user_id: f.user_id,
                process_pattern: f.process_pattern,
                agent_sequence: f.agent_id,
                tool_sequence: f.tool_sequence,
                execution_count: f.executions,
                success_count: f.successes,
                first_used_date: f.first,
                last_used_date: f.last,
                is_recommended: false,
            })
            .collect();
        Report { agents, patterns: ranked(patterns), tool_errors }
    }
}

/// `agent_score_summary` and the tool-error report, each in its order.
fn agent_tables(agents: Vec<AgentFigures>, today: Day) -> (Vec<AgentScore>, Vec<ToolErrors>) {
    let days_since = |d: Day| i64::from(today.0) - i64::from(d.0);
    let mut scores = Vec::new();
    let mut tool_errors = Vec::new();
    for f in agents {
        if f.failed_rows > 0 {
            tool_errors.push(ToolErrors {
                agent_id: f.agent_id.clone(),
                agent_name: f.agent_name.clone(),
                total_executions: f.rows,
                total_errors: f.failed_rows,
                error_rate: f.failed_rows as f64 / f.rows as f64,
                failed_tools: f.failed_tools.join(", "),
            });
        }
        let (Some(last), total, succ) = (f.last, f.executions, f.successes) else { continue };
        let days = days_since(last);
        scores.push(AgentScore {
            domain_id: f.domain_id,
            agent_id: f.agent_id,
            agent_name: f.agent_name,
            total_executions: total,
            success_count: succ,
            failure_count: total - succ,
            success_rate: score::rate(succ, total),
            last_execution_date: last,
            days_since_last_exec: days,
            time_decay_factor: score::decay(score::AGENT_DECAY, days),
            calculated_score: score::agent_score(total, succ, days),
        });
    }
    scores.sort_unstable_by(|a, b| {
        desc(a.calculated_score, b.calculated_score).then_with(|| a.domain_id.cmp(&b.domain_id)).then_with(|| a.agent_id.cmp(&b.agent_id))
    });
    tool_errors
        .sort_unstable_by(|a, b| desc(a.error_rate, b.error_rate).then_with(|| b.total_errors.cmp(&a.total_errors)).then_with(|| a.agent_id.cmp(&b.agent_id)));
    (scores, tool_errors)
}

/// `PERCENTILE_CONT(0.8)` of all pattern scores: patterns scoring at least this are recommended.
pub fn recommendation_cut(mut scores: Vec<f64>) -> Option<f64> {
    scores.sort_unstable_by(f64::total_cmp);
    score::percentile_cont(&scores, RECOMMEND_PERCENTILE)
}

/// The sessions in staging order (user, then session), so that parts of the staging table
/// can be produced in parallel.
pub struct StagingOrder<'e> {
    engine: &'e Engine,
    /// ([`id_prefix`] of the session id, session id, user, the session's rows) in order:
    /// the rows are held here so that visiting them in this order, unrelated to where
    /// sessions live, waits for their memory only once and can ask for it ahead.
    sessions: Vec<Placed<'e>>,
}

/// A session in the staging order: [`id_prefix`] of its id, its id, user and rows.
type Placed<'e> = ((u64, u64), &'e str, Sym, &'e [crate::Row]);

/// How many sessions ahead `visit` asks for the memory of rows and ids.
const PREFETCH_AHEAD: usize = 6;

impl<'e> StagingOrder<'e> {
    /// Number of sessions (the unit `visit` ranges count in).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// An upper bound of [`StagingKey::parts`].
    pub fn parts(&self) -> usize {
        self.engine.sks.len()
    }

    /// Visits the staging rows of the sessions in `range`, each session's rows by execution
    /// time, process, agent, tool, each with its [`StagingKey`].
    pub fn visit<E>(&self, range: std::ops::Range<usize>, mut f: impl FnMut(&StagingRow<'e>, StagingKey) -> Result<(), E>) -> Result<(), E> {
        let mut rows = Vec::new();
        for i in range {
            if let Some(&(_, id, _, rows)) = self.sessions.get(i + PREFETCH_AHEAD) {
                prefetch(rows);
                prefetch(id.as_bytes());
            }
            let (_, id, user, session) = self.sessions[i];
            rows.clear();
            rows.extend(self.engine.session_staging(user, id, session));
            rows.sort_unstable_by(|(_, a): &(Sym, StagingRow<'_>), (_, b)| {
                (a.execution_datetime, a.process_id, a.agent_id, a.tool_id).cmp(&(b.execution_datetime, b.process_id, b.agent_id, b.tool_id))
            });
            rows.iter().try_for_each(|(parts, row)| f(row, StagingKey { session: i, parts: *parts }))?;
        }
        Ok(())
    }
}

/// What a staging row shares with others, so that a writer can render it once: rows of
/// one session come one after the other with the same `session`, and rows with the same
/// `parts` have the same process, domain, agent and tool ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingKey {
    /// The session's place in the order.
    pub session: usize,
    /// The row's interned SK, below [`StagingOrder::parts`].
    pub parts: u32,
}

/// The first 16 bytes of `id` (zeros past its end) as two big-endian integers: they
/// compare as the bytes do, so ids compare without being read again unless these tie.
/// (Not one `u128`, whose alignment would make every entry of the order 64 bytes.)
fn id_prefix(id: &str) -> (u64, u64) {
    let mut bytes = [0u8; 16];
    let n = id.len().min(16);
    bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    let (high, low) = bytes.split_at(8);
    (u64::from_be_bytes(high.try_into().expect("8 bytes")), u64::from_be_bytes(low.try_into().expect("8 bytes")))
}

/// Asks the processor to start loading the first cache lines of `items`, without waiting.
#[inline]
fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..std::mem::size_of_val(items)).step_by(64).take(4) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is only a hint: it reads nothing into the program and never
        // faults, whatever the address; this one is inside `items` besides.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(items.as_ptr().cast::<i8>().wrapping_add(offset)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

impl Engine {
    /// The staging table's order: sessions sorted by user, then session id.
    pub fn staging_order(&self) -> StagingOrder<'_> {
        // Users sorted once; sessions are then dealt into their user's place (a counting
        // sort, one pass) and only each user's few sessions are sorted by id.
        let mut per_user = vec![0u32; self.strings.len()];
        for s in &self.sessions {
            per_user[s.user as usize] += 1;
        }
        let mut users: Vec<Sym> = (0..per_user.len() as Sym).filter(|&u| per_user[u as usize] > 0).collect();
        users.sort_unstable_by(|&a, &b| self.strings.get(a).cmp(self.strings.get(b)));
        // `per_user` becomes where each user's sessions start.
        let mut next = 0;
        let mut bounds = Vec::with_capacity(users.len() + 1);
        for &u in &users {
            bounds.push(next);
            next += std::mem::replace(&mut per_user[u as usize], next);
        }
        bounds.push(next);
        let mut sessions = vec![((0, 0), "", 0, &[][..]); self.sessions.len()];
        for s in &self.sessions {
            let at = &mut per_user[s.user as usize];
            let id = s.session_id();
            sessions[*at as usize] = (id_prefix(id), id, s.user, &s.rows[..]);
            *at += 1;
        }
        for w in bounds.windows(2) {
            sessions[w[0] as usize..w[1] as usize].sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        }
        StagingOrder { engine: self, sessions }
    }

    /// The staging table sorted by user, session, execution time, process, agent, tool.
    pub fn staging_sorted(&self) -> Vec<StagingRow<'_>> {
        let order = self.staging_order();
        let mut out = Vec::new();
        let _ = order.visit::<()>(0..order.len(), |r, _| {
            out.push(r.clone());
            Ok(())
        });
        out
    }
}
