//! Test support: a generated table history, and the batch reference of SPEC §3.
//!
//! The reference is deliberately naive — it settles the final table state (the record with
//! the highest SequenceNumber per key), then evaluates SPEC §3 with plain maps and sorts,
//! the way the seed's SQL would. It shares no code with the engine except the scoring
//! formulas' constants.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

/// One item in the final table state.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Hist { tool_nm: String, dt: String, succ: bool },
    Agent { domain: String, name: String },
    Other,
}

/// One change in the true history, in table order (its index is its sequence number).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub pk: String,
    pub sk: String,
    /// `None` removes the item; `Some(true)` in `ttl` marks a TTL removal.
    pub item: Option<Item>,
    pub ttl: bool,
}

impl Event {
    /// The DynamoDB stream record that announces this change with sequence number `seq`.
    pub fn stream_record(&self, seq: u64) -> String {
        let keys = format!(r#"{{"PK":{{"S":"{}"}},"SK":{{"S":"{}"}}}}"#, self.pk, self.sk);
        let seq = 10_000_000_000_000_000_000u128 + u128::from(seq);
        match &self.item {
            None => {
                let who = if self.ttl { r#","userIdentity":{"type":"Service","principalId":"dynamodb.amazonaws.com"}"# } else { "" };
                format!(r#"{{"eventName":"REMOVE","dynamodb":{{"Keys":{keys},"SequenceNumber":"{seq}"}}{who}}}"#)
            }
            Some(item) => {
                let attrs = match item {
                    Item::Hist { tool_nm, dt, succ } => format!(
                        r#""EntityType":{{"S":"UserSessPrcToolMappHist"}},"ToolNM":{{"S":"{tool_nm}"}},"TransactDT":{{"S":"{dt}"}},"SuccYN":{{"S":"{}"}}"#,
                        if *succ { "Y" } else { "N" }
                    ),
                    Item::Agent { domain, name } => format!(r#""EntityType":{{"S":"Agent"}},"AgentNM":{{"S":"{name}"}},"GSI1_PK":{{"S":"{domain}"}}"#),
                    Item::Other => r#""EntityType":{"S":"UserInfo"}"#.to_owned(),
                };
                format!(
                    r#"{{"eventName":"MODIFY","dynamodb":{{"Keys":{keys},"NewImage":{{"PK":{{"S":"{}"}},"SK":{{"S":"{}"}},{attrs}}},"SequenceNumber":"{seq}"}}}}"#,
                    self.pk, self.sk
                )
            }
        }
    }
}

/// The final state: the last event per key wins.
pub fn final_state(history: &[Event]) -> BTreeMap<(String, String), Item> {
    let mut state = BTreeMap::new();
    for e in history {
        let key = (e.pk.clone(), e.sk.clone());
        match &e.item {
            Some(item) => state.insert(key, item.clone()),
            None => state.remove(&key),
        };
    }
    state
}

#[derive(Debug, PartialEq, Clone)]
pub struct RefAgent {
    pub domain: String,
    pub agent: String,
    pub name: String,
    pub total: u64,
    pub succ: u64,
    pub last: String,
    pub score: f64,
}

#[derive(Debug, PartialEq, Clone)]
pub struct RefPattern {
    pub user: String,
    pub procs: String,
    pub agent: String,
    pub tools: String,
    pub count: u64,
    pub succ: u64,
    pub first: String,
    pub last: String,
    pub score: f64,
    pub recommended: bool,
}

#[derive(Debug, PartialEq, Clone)]
pub struct RefErrors {
    pub agent: String,
    pub rows: u64,
    pub errors: u64,
    pub failed_tools: String,
}

#[derive(Debug, PartialEq, Clone)]
pub struct RefStaging {
    pub user: String,
    pub session: String,
    pub process: String,
    pub domain: String,
    pub agent: String,
    pub tool: String,
    pub tool_nm: String,
    pub dt: String,
    pub succ: bool,
}

#[derive(Debug, PartialEq, Clone)]
pub struct Reference {
    pub agents: Vec<RefAgent>,
    pub patterns: Vec<RefPattern>,
    pub errors: Vec<RefErrors>,
    pub staging: Vec<RefStaging>,
}

fn date(dt: &str) -> String {
    format!("{}-{}-{}", &dt[0..4], &dt[4..6], &dt[6..8])
}

fn day_number(date: &str) -> i64 {
    let (y, m, d): (i64, i64, i64) = (date[0..4].parse().unwrap(), date[5..7].parse().unwrap(), date[8..10].parse().unwrap());
    // Days since 1970-01-01 by counting (slow and obvious).
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut n = 0;
    for yy in 1970..y {
        n += if leap(yy) { 366 } else { 365 };
    }
    let months = [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    n + months[..(m - 1) as usize].iter().sum::<i64>() + d - 1
}

/// SPEC §3 over the final table state, for `today` (YYYY-MM-DD).
pub fn evaluate(state: &BTreeMap<(String, String), Item>, today: &str) -> Reference {
    let today = day_number(today);
    let agents: BTreeMap<&str, (&str, &str)> = state
        .iter()
        .filter_map(|((pk, sk), item)| match item {
            Item::Agent { domain, name } if sk == "METADATA" => Some((pk.as_str(), (domain.as_str(), name.as_str()))),
            _ => None,
        })
        .collect();
    let mut staging = Vec::new();
    for ((pk, sk), item) in state {
        let Item::Hist { tool_nm, dt, succ } = item else { continue };
        let p: Vec<&str> = pk.split('#').collect();
        let s: Vec<&str> = sk.split('#').collect();
        let Some((domain, _)) = agents.get(s[1]) else { continue };
        staging.push(RefStaging {
            user: p[0].into(),
            session: p[1].into(),
            process: s[0].into(),
            domain: domain.to_string(),
            agent: s[1].into(),
            tool: s[2].into(),
            tool_nm: tool_nm.clone(),
            dt: dt.clone(),
            succ: *succ,
        });
    }
    // Agent executions: (user, session, domain, agent) groups.
    let mut groups: BTreeMap<(String, String, String, String), Vec<&RefStaging>> = BTreeMap::new();
    for r in &staging {
        groups.entry((r.user.clone(), r.session.clone(), r.domain.clone(), r.agent.clone())).or_default().push(r);
    }
    let mut per_agent: BTreeMap<(String, String), (u64, u64, String)> = BTreeMap::new();
    // (user, processes, agent, tools) → (executions, successes, first, last)
    type Key = (String, String, String, String);
    let mut per_pattern: BTreeMap<Key, (u64, u64, String, String)> = BTreeMap::new();
    for ((user, _, domain, agent), rows) in &groups {
        let ok = rows.iter().all(|r| r.succ);
        let last = rows.iter().map(|r| date(&r.dt)).max().unwrap();
        let first = rows.iter().map(|r| date(&r.dt)).min().unwrap();
        let e = per_agent.entry((domain.clone(), agent.clone())).or_insert((0, 0, String::new()));
        e.0 += 1;
        e.1 += u64::from(ok);
        e.2 = e.2.clone().max(last.clone());
        let mut ordered = rows.clone();
        ordered.sort_by(|a, b| (&a.dt, &a.process, &a.tool).cmp(&(&b.dt, &b.process, &b.tool)));
        let procs = ordered.iter().map(|r| r.process.as_str()).collect::<Vec<_>>().join("->");
        let tools = ordered.iter().map(|r| r.tool_nm.as_str()).collect::<Vec<_>>().join("->");
        let p = per_pattern.entry((user.clone(), procs, agent.clone(), tools)).or_insert((0, 0, first.clone(), last.clone()));
        p.0 += 1;
        p.1 += u64::from(ok);
        p.2 = p.2.clone().min(first);
        p.3 = p.3.clone().max(last);
    }
    let agents_out = per_agent
        .into_iter()
        .map(|((domain, agent), (total, succ, last))| {
            let rate = succ as f64 / total as f64;
            let score = total as f64 * (-0.1 * (today - day_number(&last)) as f64).exp() * rate.powi(2);
            RefAgent { name: agents[agent.as_str()].1.to_owned(), domain, agent, total, succ, last, score }
        })
        .collect();
    let mut patterns: Vec<RefPattern> = per_pattern
        .into_iter()
        .map(|((user, procs, agent, tools), (count, succ, first, last))| {
            let rate = succ as f64 / count as f64;
            let score = count as f64 * rate.powi(2) * (-0.05 * (today - day_number(&last)) as f64).exp();
            RefPattern { user, procs, agent, tools, count, succ, first, last, score, recommended: false }
        })
        .collect();
    let mut scores: Vec<f64> = patterns.iter().map(|p| p.score).collect();
    scores.sort_by(f64::total_cmp);
    if !scores.is_empty() {
        let pos = 0.8 * (scores.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let cut = scores[lo] + (pos - lo as f64) * (scores[hi] - scores[lo]);
        for p in &mut patterns {
            p.recommended = p.score >= cut;
        }
    }
    let mut errors = Vec::new();
    let by_agent: BTreeSet<&str> = staging.iter().map(|r| r.agent.as_str()).collect();
    for agent in by_agent {
        let rows: Vec<&RefStaging> = staging.iter().filter(|r| r.agent == agent).collect();
        let failed: BTreeSet<&str> = rows.iter().filter(|r| !r.succ).map(|r| r.tool_nm.as_str()).collect();
        let n_failed = rows.iter().filter(|r| !r.succ).count() as u64;
        if n_failed > 0 {
            errors.push(RefErrors {
                agent: agent.to_owned(),
                rows: rows.len() as u64,
                errors: n_failed,
                failed_tools: failed.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
    }
    Reference { agents: agents_out, patterns, errors, staging }
}

/// The engine's output in the reference's shape and order.
pub fn from_engine(report: &toolrank_engine::Report, staging: &[toolrank_engine::StagingRow]) -> Reference {
    let agents: Vec<RefAgent> = report
        .agents
        .iter()
        .map(|a| RefAgent {
            domain: a.domain_id.clone(),
            agent: a.agent_id.clone(),
            name: a.agent_name.clone().unwrap_or_default(),
            total: a.total_executions,
            succ: a.success_count,
            last: a.last_execution_date.to_string(),
            score: a.calculated_score,
        })
        .collect();
    let patterns: Vec<RefPattern> = report
        .patterns
        .iter()
        .map(|p| RefPattern {
            user: p.user_id.clone(),
            procs: p.process_pattern.clone(),
            agent: p.agent_sequence.clone(),
            tools: p.tool_sequence.clone(),
            count: p.execution_count,
            succ: p.success_count,
            first: p.first_used_date.to_string(),
            last: p.last_used_date.to_string(),
            score: p.pattern_score,
            recommended: p.is_recommended,
        })
        .collect();
    let errors: Vec<RefErrors> = report
        .tool_errors
        .iter()
        .map(|e| RefErrors { agent: e.agent_id.clone(), rows: e.total_executions, errors: e.total_errors, failed_tools: e.failed_tools.clone() })
        .collect();
    let staging: Vec<RefStaging> = staging
        .iter()
        .map(|r| RefStaging {
            user: r.user_id.to_string(),
            session: r.session_id.to_string(),
            process: r.process_id.to_string(),
            domain: r.domain_id.to_string(),
            agent: r.agent_id.to_string(),
            tool: r.tool_id.to_string(),
            tool_nm: r.tool_nm.to_string(),
            dt: format!("{}", r.execution_datetime.packed),
            succ: r.success_flag,
        })
        .collect();
    canonical(Reference { agents, patterns, errors, staging })
}

/// Rows of every table sorted by their identity, so that outputs compare as sets.
pub fn canonical(mut r: Reference) -> Reference {
    r.agents.sort_by(|a, b| (&a.domain, &a.agent).cmp(&(&b.domain, &b.agent)));
    r.patterns.sort_by(|a, b| (&a.user, &a.procs, &a.agent, &a.tools).cmp(&(&b.user, &b.procs, &b.agent, &b.tools)));
    r.errors.sort_by(|a, b| a.agent.cmp(&b.agent));
    r.staging.sort_by(|a, b| (&a.user, &a.session, &a.process, &a.agent, &a.tool).cmp(&(&b.user, &b.session, &b.process, &b.agent, &b.tool)));
    r
}
